"""``switchdit convert CKPT OUT.safetensors``: a training checkpoint -> one model file.

CKPT is a run directory (its newest complete checkpoint is used) or one checkpoint directory
``RUN/checkpoints/step_XXXXXXXX``, written by any number of processes and any expert-parallel size.
Sources (layout in ``train/checkpoint.py``):

- ``--weights ema`` (default): ``ema_shared.safetensors`` and every ``ema_experts_ep{p}.safetensors``,
  already under the single-device model's names;
- ``--weights model``: DeepSpeed's ``mp_rank_00_model_states.pt`` (replicated weights, ``module``)
  and one ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt`` per global expert, whose
  ``...deepspeed_experts.{E}...`` keys are renamed to ``blocks.N.moe.experts.{E}...``.

Everything is checked before anything is written: the checkpoint is complete, every file is there,
the files agree on the step, and the merged tensors match the model config of ``meta.json`` key by
key and shape by shape. The output is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from switchdit_dist.errors import UserError

WEIGHT_CHOICES = ("ema", "model")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_STATES = "mp_rank_00_model_states.pt"
_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


@dataclass
class ConvertOptions:
    checkpoint: str
    out: str
    weights: str = "ema"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_CHOICES:
            raise UserError(f"--weights must be one of {WEIGHT_CHOICES}, got {self.weights!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run directory (newest complete checkpoint) or a step_* directory")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument(
        "--weights", choices=WEIGHT_CHOICES, default="ema", help="EMA (default) or raw weights"
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="stored dtype (default fp32)")


def run(args: argparse.Namespace) -> int:
    options = ConvertOptions(args.checkpoint, args.out, args.weights, args.dtype)
    path, step = convert(options)
    print(f"wrote {options.out}: {options.weights} weights of step {step} from {path}")
    return 0


# --- locating and checking the checkpoint ---------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint named by ``path``: a run directory or its checkpoints/ folder (the newest
    complete checkpoint), or one checkpoint directory."""
    from switchdit_dist.train.checkpoint import find_resume_point, is_complete

    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"{path}: no such directory (expected a run directory or a checkpoints/step_* directory)"
        )
    # a run directory, or its checkpoints/ folder
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if folder is not path or any(folder.glob("step_*/")):
        found = find_resume_point(folder)
        if found is None:
            raise UserError(f"{path}: no complete checkpoint under {folder}")
        return found
    if not (path / "meta.json").is_file() and not path.name.startswith("step_"):
        raise UserError(
            f"{path}: neither a run directory (with checkpoints/) nor a checkpoint directory (with meta.json)"
        )
    if not is_complete(path):
        raise UserError(
            f"{path}: incomplete checkpoint (no COMPLETE marker: its writing was interrupted); "
            "convert a complete one, e.g. the run directory's newest"
        )
    return path


def read_meta(path: Path) -> dict[str, Any]:
    file = path / "meta.json"
    if not file.is_file():
        raise UserError(f"{path}: lacks meta.json (step, topology and model config of the checkpoint)")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not valid JSON ({err})") from None
    required = ("step", "world_size", "ep_size", "model")
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{file}: lacks key(s) {missing}")
    return meta


def model_config_of(meta: dict[str, Any], source: Path):
    from switchdit_dist.config import ModelSection

    try:
        return ModelSection(**meta["model"]).build_config()
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{source / 'meta.json'}: invalid model section ({err})") from None


def _require(file: Path) -> Path:
    if not file.is_file():
        raise UserError(f"checkpoint {file.parent} lacks {file.name}")
    return file


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(_require(file), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise UserError(f"{file}: not a readable checkpoint file ({type(err).__name__}: {err})") from None


def _safetensors_step(file: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(_require(file)), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{file}: not a valid safetensors file ({err})") from None
    return int(step) if step is not None else None


def check_same_step(path: Path, meta: dict[str, Any], files: dict[Path, int | None]) -> None:
    """Every file that records a step must record meta.json's."""
    expected = int(meta["step"])
    marker = (path / "COMPLETE").read_text().strip()
    recorded = {path / "COMPLETE": int(marker) if marker.isdigit() else None, **files}
    for side in sorted(path.glob("side_rank_*.pt")):
        recorded[side] = int(_torch_load(side)["step"])
    wrong = [
        f"{file.name} (step {step})"
        for file, step in recorded.items()
        if step is not None and step != expected
    ]
    if wrong:
        raise UserError(
            f"checkpoint {path} mixes files from different steps: meta.json says step {expected}, but "
            + ", ".join(wrong)
        )


# --- gathering the weights ----------------------------------------------------------------------


def ema_state(
    path: Path, meta: dict[str, Any], is_moe: bool
) -> tuple[dict[str, torch.Tensor], dict[Path, int | None]]:
    from safetensors.torch import load_file

    files = [path / "ema_shared.safetensors"]
    if is_moe:
        files += [path / f"ema_experts_ep{p}.safetensors" for p in range(int(meta["ep_size"]))]
    steps = {file: _safetensors_step(file) for file in files}
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state, steps


def model_state(
    path: Path, num_blocks: int, num_experts: int
) -> tuple[dict[str, torch.Tensor], dict[Path, int | None]]:
    from switchdit_dist.train import param_names

    states = _torch_load(path / MODEL_STATES)
    if not isinstance(states, dict) or "module" not in states:
        raise UserError(f"{path / MODEL_STATES}: not a DeepSpeed model-states file (no 'module' entry)")
    state = dict(states["module"])
    steps: dict[Path, int | None] = {path / MODEL_STATES: states.get("global_steps")}
    for layer in range(num_blocks if num_experts else 0):
        for expert in range(num_experts):
            file = path / f"layer_{layer}_expert_{expert}_{MODEL_STATES}"
            for key, tensor in _torch_load(file).items():
                global_name = param_names.to_global(key, 0, num_experts)
                ids = re.findall(r"\.experts\.(\d+)\.", global_name)
                if not ids or int(ids[-1]) != expert:
                    raise UserError(f"{file}: holds {key!r}, which is not expert {expert}")
                state[global_name] = tensor
    unexpected = sorted(
        p.name
        for p in path.glob(f"layer_*_{MODEL_STATES}")
        if not _expected_expert_file(p.name, num_blocks, num_experts)
    )
    if unexpected:
        raise UserError(
            f"checkpoint {path} has expert files beyond the model config ({num_blocks} MoE layers x "
            f"{num_experts} experts): {unexpected[:3]}"
        )
    return state, steps


def _expected_expert_file(name: str, num_blocks: int, num_experts: int) -> bool:
    match = _EXPERT_FILE.match(name)
    return bool(match) and int(match.group(1)) < num_blocks and int(match.group(2)) < num_experts


def diffusion_settings(path: Path) -> dict[str, Any] | None:
    """The run's diffusion section (from RUN/config.yaml next to checkpoints/), if there is one."""
    import yaml

    config_file = path.parent.parent / "config.yaml"
    if path.parent.name != "checkpoints" or not config_file.is_file():
        return None
    try:
        section = (yaml.safe_load(config_file.read_text()) or {}).get("diffusion")
    except yaml.YAMLError:
        return None
    return section if isinstance(section, dict) else None


def convert(options: ConvertOptions) -> tuple[Path, int]:
    """Check and merge the checkpoint, write ``options.out``; returns (checkpoint dir, step)."""
    from switchdit_dist.export.load import check_state_dict, save_model_file
    from switchdit_dist.models.registry import build_model
    from switchdit_dist.models.switch_dit import SwitchDiTConfig

    out = Path(options.out)
    if not out.parent.is_dir():
        raise UserError(f"{out}: the output folder {out.parent} does not exist")
    path = resolve_checkpoint(options.checkpoint)
    meta = read_meta(path)
    config = model_config_of(meta, path)
    is_moe = isinstance(config, SwitchDiTConfig)
    if options.weights == "ema":
        state, steps = ema_state(path, meta, is_moe)
    else:
        state, steps = model_state(path, config.depth, config.num_experts if is_moe else 0)
    check_same_step(path, meta, steps)
    with torch.device("meta"):
        reference = build_model(config)
    check_state_dict(reference, state, source=f"checkpoint {path} ({options.weights} weights)")
    dtype = DTYPES[options.dtype]
    state = {k: v.to(dtype) for k, v in state.items()}
    extra = {"step": int(meta["step"]), "weights": options.weights, "source_checkpoint": str(path.resolve())}
    diffusion = diffusion_settings(path)
    if diffusion is not None:
        extra["diffusion"] = diffusion
    save_model_file(out, state, config, extra)
    return path, int(meta["step"])
