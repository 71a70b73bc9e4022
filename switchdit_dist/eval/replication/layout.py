"""Where the replication keeps each file under its output folder (one place for every name).

OUT/data/                                   the prepared digits (fixed split)
OUT/seed_S/MODEL/                           one training run (checkpoints, metrics.jsonl, ...)
OUT/seed_S/MODEL/train.done                 marker: training finished (JSON: seconds, commit)
OUT/seed_S/MODEL/ema_step_XXXXXXXX.safetensors
OUT/seed_S/MODEL/eval_step_XXXXXXXX_sampling_K.json   one evaluation (sampling seed K)
OUT/invocations.jsonl                       one line per invocation (command, commit, times)
OUT/wall_seconds.tsv                        phase <TAB> seconds
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MODELS = ("dit", "switch-dit")
LABELS = {"dit": "DiT", "switch-dit": "Switch-DiT"}
_SEED_DIR = re.compile(r"^seed_(\d+)$")
_EVAL_FILE = re.compile(r"^eval_step_(\d{8})_sampling_(\d+)\.json$")


def step_tag(step: int) -> str:
    """The trainer's checkpoint folder name for ``step``."""
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Layout:
    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def settings(self) -> Path:
        return self.out / "settings.json"

    @property
    def invocations(self) -> Path:
        return self.out / "invocations.jsonl"

    @property
    def wall_seconds(self) -> Path:
        return self.out / "wall_seconds.tsv"

    def run_dir(self, model: str, seed: int) -> Path:
        return self.out / f"seed_{seed}" / model

    def train_marker(self, model: str, seed: int) -> Path:
        return self.run_dir(model, seed) / "train.done"

    def checkpoint(self, model: str, seed: int, step: int) -> Path:
        return self.run_dir(model, seed) / "checkpoints" / step_tag(step)

    def ema_model(self, model: str, seed: int, step: int) -> Path:
        return self.run_dir(model, seed) / f"ema_{step_tag(step)}.safetensors"

    def eval_file(self, model: str, seed: int, step: int, sampling_seed: int) -> Path:
        return self.run_dir(model, seed) / f"eval_{step_tag(step)}_sampling_{sampling_seed}.json"

    def seeds(self) -> list[int]:
        """Training seeds with a folder under OUT, ascending."""
        if not self.out.is_dir():
            return []
        found = (_SEED_DIR.match(p.name) for p in self.out.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def eval_files(self, model: str, seed: int) -> dict[tuple[int, int], Path]:
        """(step, sampling seed) -> evaluation file of one run."""
        run = self.run_dir(model, seed)
        if not run.is_dir():
            return {}
        found = {}
        for path in run.iterdir():
            m = _EVAL_FILE.match(path.name)
            if m:
                found[(int(m.group(1)), int(m.group(2)))] = path
        return found
