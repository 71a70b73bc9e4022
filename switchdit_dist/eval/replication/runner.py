"""Trains and evaluates every (model, training seed) of a replication, skipping finished work.

Each unit of work leaves a file that says it is done, written only once the work succeeded:
``train.done`` after a training run, the EMA model file after a conversion (written under a
temporary name by ``convert``), the evaluation JSON after an evaluation (renamed into place). A
rerun with the same output folder skips whatever has its file; an interrupted training run is
started again on its run directory, where the trainer resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from switchdit_dist.errors import UserError
from switchdit_dist.eval.replication.layout import MODELS, Layout
from switchdit_dist.eval.replication.scoring import EvalSettings, Scorer


@dataclass(frozen=True)
class RunSettings:
    out: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1800
    eval_every: int = 600
    data: Path | None = None  # prepared digits; default OUT/data
    config: Path = Path("configs/demo.yaml")
    nproc: int = 2
    experts: int = 3
    ep_size: int = 1
    zero_stage: int = 0
    sampling_seed: int = 0  # the one sampling seed of every evaluation
    spread_seeds: int = 3  # extra sampling seeds for the sampling-noise measurement
    eval_threads: int = 2
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise UserError(f"--seeds must be distinct non-negative integers, got {list(self.seeds)}")
        if self.eval_every < 1 or self.steps < self.eval_every or self.steps % self.eval_every:
            raise UserError(
                f"--steps must be a positive multiple of --eval-every, got --steps {self.steps} "
                f"--eval-every {self.eval_every}"
            )
        for name, value in (
            ("--nproc", self.nproc),
            ("--experts", self.experts),
            ("--ep-size", self.ep_size),
        ):
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.spread_seeds < 0:
            raise UserError(f"--spread-seeds must be >= 0, got {self.spread_seeds}")

    def fixed(self) -> dict[str, Any]:
        """What finished work depends on: a rerun in the same folder must keep all of it."""
        return {
            "steps": self.steps,
            "eval_every": self.eval_every,
            "config": str(self.config),
            "nproc": self.nproc,
            "experts": self.experts,
            "ep_size": self.ep_size,
            "zero_stage": self.zero_stage,
            "sampling_seed": self.sampling_seed,
            **asdict(self.eval),
        }

    @property
    def eval_steps(self) -> list[int]:
        return list(range(self.eval_every, self.steps + 1, self.eval_every))

    @property
    def val_every(self) -> int:
        # About 18 validation points over the run (every 100 of 1800 steps), on every evaluation step.
        target = max(1, self.steps // 18)
        return max(d for d in range(1, self.eval_every + 1) if self.eval_every % d == 0 and d <= target)

    @property
    def spread_sampling_seeds(self) -> list[int]:
        return [self.sampling_seed + k for k in range(1, self.spread_seeds + 1)]


def log(message: str) -> None:
    print(f"[replicate {datetime.now(timezone.utc):%H:%M:%S}] {message}", flush=True)


def code_version(repo: Path) -> str:
    """``git rev-parse --short HEAD``, with "+uncommitted" when tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    return commit + ("+uncommitted" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_json_atomically(path: Path, record: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)


class Replication:
    def __init__(self, settings: RunSettings, command: str, repo: Path | None = None):
        self.s = settings
        self.layout = Layout(settings.out)
        self.command = command
        self.version = code_version(repo or Path.cwd())
        self._scorer: Scorer | None = None

    # --- bookkeeping -----------------------------------------------------------------------------

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        with open(self.layout.wall_seconds, "a") as f:
            f.write(f"{phase}\t{time.perf_counter() - start:.1f}\n")

    @contextmanager
    def invocation(self) -> Iterator[None]:
        """Appends one line to OUT/invocations.jsonl: command, code version, start, end, status."""
        self.s.out.mkdir(parents=True, exist_ok=True)
        start, started = time.time(), datetime.now(timezone.utc)
        status = "interrupted"
        try:
            yield
            status = "finished"
        except Exception:
            status = "failed"
            raise
        finally:
            record = {
                "command": self.command,
                "code_version": self.version,
                "start_utc": started.isoformat(timespec="seconds"),
                "end_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "wall_seconds": round(time.time() - start, 1),
                "status": status,
            }
            with open(self.layout.invocations, "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- the work --------------------------------------------------------------------------------

    def data_dir(self) -> Path:
        data = self.s.data or self.layout.data
        if self.s.data is None and not (data / "manifest.json").is_file():
            log(f"preparing the digits (20% held out, fixed split) -> {data}")
            with self._timed("prepare"):
                self._call(["prepare", "digits", "--out", str(data), "--val-fraction", "0.2"])
        if not (data / "manifest.json").is_file():
            raise UserError(f"{data}/manifest.json not found (--data)")
        return data

    def overrides(self, model: str, seed: int, data: Path) -> list[str]:
        s = self.s
        common = [
            f"data.shards={data / 'manifest.json'}",
            f"train.steps={s.steps}",
            f"train.seed={seed}",
            f"data.seed={seed}",
            # 0.995: the first evaluation is not dominated by the initial weights (0.999^600 = 0.55).
            "train.ema_decay=0.995",
            f"parallel.zero_stage={s.zero_stage}",
            f"checkpoint.every={s.eval_every}",
            f"checkpoint.keep={len(s.eval_steps)}",  # every evaluated checkpoint survives a resume
            f"logging.every={s.val_every}",
            "logging.progress=false",
        ]
        if (data / "val" / "manifest.json").is_file():
            common += [
                f"data.validation_shards={data / 'val' / 'manifest.json'}",
                f"logging.val_every={s.val_every}",
            ]
        if model == "dit":
            return ["model.arch=dit", "parallel.ep_size=1", *common]
        return [
            "model.arch=switch-dit",
            f"model.num_experts={s.experts}",
            "model.top_k=2",
            f"parallel.ep_size={s.ep_size}",
            "model.prior_loss_weight=1.0",
            *common,
        ]

    def train(self, model: str, seed: int, data: Path) -> None:
        marker = self.layout.train_marker(model, seed)
        if marker.is_file():
            log(f"skip training {model} seed {seed}: done ({marker})")
            return
        run = self.layout.run_dir(model, seed)
        run.parent.mkdir(parents=True, exist_ok=True)
        log(f"training {model} seed {seed}: {self.s.steps} steps -> {run}")
        start = time.perf_counter()
        with self._timed(f"train_{model}_seed{seed}"):
            self._call(
                ["launch", "--nproc", str(self.s.nproc), "--", "train", "--config", str(self.s.config)]
                + ["--run-dir", str(run), *self.overrides(model, seed, data)]
            )
        missing = [s for s in self.s.eval_steps if not self.layout.checkpoint(model, seed, s).is_dir()]
        if missing:
            raise UserError(f"{run}: training ended without the checkpoints of steps {missing}")
        write_json_atomically(
            marker, {"seconds": round(time.perf_counter() - start, 1), "code_version": self.version}
        )

    def evaluate(self, model: str, seed: int, step: int, sampling_seed: int) -> None:
        result = self.layout.eval_file(model, seed, step, sampling_seed)
        if result.is_file():
            log(f"skip evaluating {model} seed {seed} step {step} sampling seed {sampling_seed}: done")
            return
        ema = self.layout.ema_model(model, seed, step)
        if not ema.is_file():
            from switchdit_dist.export.convert import ConvertOptions, convert

            convert(ConvertOptions(str(self.layout.checkpoint(model, seed, step)), str(ema), "ema"))
        log(f"evaluating {model} seed {seed} step {step} sampling seed {sampling_seed}")
        with self._timed(f"eval_{model}_seed{seed}_step{step}_sampling{sampling_seed}"):
            record = self.scorer().score(ema, sampling_seed)
        record.update(model=model, seed=seed, step=step, code_version=self.version)
        write_json_atomically(result, record)

    def scorer(self) -> Scorer:
        if self._scorer is None:
            import torch

            torch.set_num_threads(self.s.eval_threads)  # evaluation runs alone: all the cores
            self._scorer = Scorer(self.s.eval)
        return self._scorer

    def check_settings(self) -> None:
        """Refuses to mix settings in one folder: skipped work would silently keep the old ones."""
        path = self.layout.settings
        fixed = self.s.fixed()
        if path.is_file():
            before = json.loads(path.read_text())
            changed = sorted(k for k in fixed.keys() | before.keys() if fixed.get(k) != before.get(k))
            if changed:
                detail = ", ".join(f"{k}: {before.get(k)!r} -> {fixed.get(k)!r}" for k in changed)
                raise UserError(
                    f"{self.s.out} holds a replication with other settings ({detail}); "
                    "use another --out, or the same settings (only --seeds and --spread-seeds may change)"
                )
        else:
            write_json_atomically(path, fixed)

    def run(self) -> None:
        self.check_settings()
        data = self.data_dir()
        for index, seed in enumerate(self.s.seeds):
            for model in MODELS:
                self.train(model, seed, data)
            for model in MODELS:
                for step in self.s.eval_steps:
                    self.evaluate(model, seed, step, self.s.sampling_seed)
            if index == 0:
                # Sampling noise, apart from training noise: one checkpoint pair, other sampling seeds.
                for model in MODELS:
                    for sampling_seed in self.s.spread_sampling_seeds:
                        self.evaluate(model, seed, self.s.steps, sampling_seed)

    def _call(self, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "switchdit_dist.cli", *args]
        proc = subprocess.Popen(cmd)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # the trainer checkpoints on the forwarded signal; let it finish
            raise
        if code != 0:
            raise UserError(f"`switchdit {' '.join(args[:2])} ...` exited with status {code}")
