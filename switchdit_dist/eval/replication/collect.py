"""Reads a replication's output folder back into numbers: per (model, training seed) run, its
evaluations, validation losses (overall and per timestep bucket) and measured step times.

A resumed training run appends the replayed steps to its logs again; the last line of a step wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchdit_dist.errors import UserError
from switchdit_dist.eval.replication.layout import MODELS, Layout
from switchdit_dist.train.metrics import NUM_BUCKETS


@dataclass
class EvalRecord:
    step: int
    sampling_seed: int
    frechet_distance: float
    accuracy: float
    num_samples: int
    seconds: float  # sampling + scoring
    code_version: str = ""


@dataclass
class RunData:
    model: str
    seed: int
    evals: dict[tuple[int, int], EvalRecord] = field(default_factory=dict)  # (step, sampling seed)
    val_loss: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    val_buckets: dict[int, list[float | None]] = field(default_factory=dict)  # step -> t0..t9
    step_time_s: dict[int, float] = field(default_factory=dict)  # logged step -> s per step
    train: dict[str, Any] = field(default_factory=dict)  # the train.done marker

    def eval_curve(self, sampling_seed: int) -> dict[int, EvalRecord]:
        return {step: r for (step, k), r in sorted(self.evals.items()) if k == sampling_seed}


@dataclass
class Collected:
    runs: dict[tuple[str, int], RunData]
    seeds: list[int]  # training seeds evaluated for both models at every evaluation step
    eval_steps: list[int]
    sampling_seed: int
    invocations: list[dict[str, Any]]


def _json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON line") from None
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: expected a JSON object ({err})") from None


def read_eval(path: Path, step: int, sampling_seed: int) -> EvalRecord:
    record = _read_json(path)
    try:
        return EvalRecord(
            step=step,
            sampling_seed=sampling_seed,
            frechet_distance=float(record["frechet_distance"]),
            accuracy=float(record["accuracy"]),
            num_samples=int(record["num_samples"]),
            seconds=float(record.get("sampling_seconds", 0.0)) + float(record.get("scoring_seconds", 0.0)),
            code_version=str(record.get("code_version", "")),
        )
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{path}: expected 'frechet_distance', 'accuracy' and 'num_samples' numbers"
        ) from None


def read_run(layout: Layout, model: str, seed: int) -> RunData:
    run_dir = layout.run_dir(model, seed)
    data = RunData(model, seed)
    for (step, k), path in layout.eval_files(model, seed).items():
        data.evals[(step, k)] = read_eval(path, step, k)
    for record in _json_lines(run_dir / "validation.jsonl"):
        try:
            step = int(record["step"])
            data.val_loss[step] = float(record["val_loss"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{run_dir / 'validation.jsonl'}: a line without 'step' and 'val_loss'") from None
        data.val_buckets[step] = [record.get(f"val_loss_t{i}") for i in range(NUM_BUCKETS)]
    for record in _json_lines(run_dir / "metrics.jsonl"):
        if record.get("step_time_s") is not None:
            data.step_time_s[int(record["step"])] = float(record["step_time_s"])
    marker = layout.train_marker(model, seed)
    if marker.is_file():
        data.train = _read_json(marker)
    return data


def collect(out: str | Path, sampling_seed: int = 0) -> Collected:
    """Every run under ``out``; ``seeds`` keeps the training seeds complete for both models (the
    same evaluation steps, each evaluated with ``sampling_seed``), so every comparison is paired."""
    layout = Layout(Path(out))
    runs = {(m, seed): read_run(layout, m, seed) for seed in layout.seeds() for m in MODELS}
    complete, steps_seen = [], None
    for seed in layout.seeds():
        curves = [sorted(runs[(m, seed)].eval_curve(sampling_seed)) for m in MODELS]
        if not curves[0] or curves[0] != curves[1]:
            continue
        if steps_seen is not None and curves[0] != steps_seen:
            raise UserError(
                f"{out}: seed {seed} was evaluated at steps {curves[0]}, another seed at {steps_seen}; "
                "expected the same steps for every seed (same --steps and --eval-every)"
            )
        steps_seen = curves[0]
        complete.append(seed)
    if not complete:
        raise UserError(
            f"{out}: no training seed has both models evaluated at the same steps with sampling seed "
            f"{sampling_seed} (has the replication run?)"
        )
    return Collected(runs, complete, steps_seen or [], sampling_seed, _json_lines(layout.invocations))
