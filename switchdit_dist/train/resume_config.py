"""What a resumed run may change: refuse changes of meaning, record the others, apply them.

A run directory with a complete checkpoint resumes from it. The config it was trained with is the
last entry of ``RUN_DIR/config_history.jsonl`` (or, for a run started before the history existed,
``RUN_DIR/config.yaml``). Against it, before any rank starts:

- keys in ``FROZEN`` (the architecture, the diffusion process) may not change: the run is refused
  with each key's old and new value;
- every other change is allowed and appended to the history, one JSON line per start that changed
  something: ``{"time", "step", "changed": {key: [old, new]}, "config"}``. A fresh start records its
  whole config with ``step`` 0. So the config a checkpoint of step S was trained with is the last
  entry whose step is below S (``trained_with``), which ``switchdit convert`` records.

A key the recorded config lacks (one added to the schema since) counts as its default then.
Optimizer settings are part of the optimizer state DeepSpeed restores, so a resumed run would keep
the old ones without ``apply_optimizer_settings``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from switchdit_dist.config import Config
from switchdit_dist.errors import UserError

HISTORY_NAME = "config_history.jsonl"

ARCHITECTURE = tuple(
    f"model.{k}"
    for k in (
        "arch",
        "size",
        "patch_size",
        "input_size",
        "in_channels",
        "num_classes",
        "learn_sigma",
        "num_experts",
        "top_k",
        "expert_kind",
        "expert_mlp_ratio",
    )
)
DIFFUSION = ("diffusion.num_timesteps", "diffusion.noise_schedule")
FROZEN: dict[str, str] = {
    **{k: "a different model" for k in ARCHITECTURE},
    **{k: "a different diffusion process" for k in DIFFUSION},
}


def _refusals(changed: dict[str, tuple[Any, Any]]) -> dict[str, str]:
    """The changed keys that may not change, with why."""
    out = {k: FROZEN[k] for k in changed if k in FROZEN}
    dropout = changed.get("model.class_dropout_prob")
    if dropout is not None and (_positive(dropout[0]) != _positive(dropout[1])):
        # the null-class embedding (classifier-free guidance) exists only with a dropout above 0
        out["model.class_dropout_prob"] = "a different model: the null-class embedding comes and goes with it"
    return out


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and value > 0


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    file = Path(run_dir) / HISTORY_NAME
    if not file.is_file():
        return []
    entries = []
    for line in file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
            entries.append(entry)
    return entries


def _config_yaml(run_dir: Path) -> dict[str, Any] | None:
    file = Path(run_dir) / "config.yaml"
    if not file.is_file():
        return None
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return None
    return raw if isinstance(raw, dict) else None


def recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config the run directory was last started with (nested), or None."""
    history = _read_history(run_dir)
    return history[-1]["config"] if history else _config_yaml(run_dir)


def trained_with(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The config that trained the checkpoint of ``step``: the last start below that step."""
    earlier = [e for e in _read_history(run_dir) if int(e.get("step", 0)) < step]
    if earlier:
        return earlier[-1]["config"]
    return None if _read_history(run_dir) else _config_yaml(run_dir)


@dataclass
class ResumePlan:
    step: int  # the checkpoint resumed from; 0 for a fresh start
    checkpoint: Path | None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    previous: dict[str, Any] | None = None  # the recorded config, when there is no history yet


def _changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    before = {**flatten(Config().to_dict()), **flatten(old)}
    after = flatten(new)
    return {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}


def check(run_dir: Path, config: Config) -> ResumePlan:
    """Compare ``config`` with what the run directory's checkpoint was trained with; raise one
    UserError listing every key that may not change."""
    from switchdit_dist.train.checkpoint import find_resume_point, step_of

    run_dir = Path(run_dir)
    checkpoint = find_resume_point(run_dir / "checkpoints")
    if checkpoint is None:
        return ResumePlan(step=0, checkpoint=None)
    old = recorded_config(run_dir)
    plan = ResumePlan(step=step_of(checkpoint.name), checkpoint=checkpoint)
    if old is None:
        return plan  # nothing recorded to compare with (the trainer still checks the model hash)
    plan.changed = _changes(old, config.to_dict())
    if not _read_history(run_dir):
        plan.previous = old
    refused = _refusals(plan.changed)
    if refused:
        details = "; ".join(
            f"{k}: {plan.changed[k][0]!r} -> {plan.changed[k][1]!r} ({why})" for k, why in refused.items()
        )
        raise UserError(
            f"cannot resume {run_dir} from {checkpoint.name} with these changes: {details}. They may not "
            "change on resume (docs/checkpoints.md); restore the recorded values (see "
            f"{run_dir / 'config.yaml'}), or start a new run with them: the same command with another "
            "--run-dir"
        )
    return plan


def record(run_dir: Path, config: Config, plan: ResumePlan) -> None:
    """Append the start to the history when it is a fresh start or changed something (rank 0)."""
    if plan.checkpoint is not None and not plan.changed:
        return
    lines = []
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if plan.previous is not None:  # the first history of an older run: keep what it recorded
        lines.append({"time": now, "step": 0, "changed": {}, "config": plan.previous, "from": "config.yaml"})
    changed = {k: [old, new] for k, (old, new) in plan.changed.items()}
    lines.append({"time": now, "step": plan.step, "changed": changed, "config": config.to_dict()})
    with open(Path(run_dir) / HISTORY_NAME, "a") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
        f.flush()


def describe_changes(plan: ResumePlan) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in plan.changed.items())


def apply_optimizer_settings(engine: Any, config: Config) -> None:
    """Put the config's optimizer settings into the restored optimizer (DeepSpeed restores the
    checkpoint's learning rate, betas, eps and weight decay with the optimizer state, and the
    checkpoint's base learning rate with the schedule). The schedule's step stays as restored."""
    o = config.optim
    scheduler = getattr(engine, "lr_scheduler", None)
    optimizer = getattr(scheduler, "optimizer", None) or engine.optimizer
    factor = 1.0
    if scheduler is not None and hasattr(scheduler, "lr_lambdas"):
        scheduler.base_lrs = [o.lr for _ in scheduler.base_lrs]
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(lr=o.lr * factor, initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        group["weight_decay"] = o.weight_decay
