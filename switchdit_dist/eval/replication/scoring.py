"""One evaluation of one model file: N class-balanced samples, scored by the digits classifier.

Runs in the calling process so the classifier and the reference statistics are loaded once for
every evaluation of a replication. Both models get the same labels, batch size and sampling seed,
hence the same starting noise: their difference is not blurred by different draws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from switchdit_dist.errors import UserError
from switchdit_dist.eval.digits_data import NUM_DIGIT_CLASSES


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 1000  # per evaluation, 1/10 per digit
    sampling_steps: int = 10
    sampler: str = "ddim"
    cfg_scale: float = 1.5
    batch_size: int = 250  # images per sampling batch

    def __post_init__(self) -> None:
        if self.samples < NUM_DIGIT_CLASSES or self.samples % NUM_DIGIT_CLASSES:
            raise UserError(
                f"--samples must be a positive multiple of {NUM_DIGIT_CLASSES}, got {self.samples}"
            )
        if self.batch_size < 1:
            raise UserError(f"--eval-batch must be >= 1, got {self.batch_size}")


class Scorer:
    """Holds the digits evaluator (classifier + held-out statistics) across evaluations."""

    def __init__(self, settings: EvalSettings):
        from switchdit_dist.eval.digits_metrics import DigitsEvaluator

        self.settings = settings
        self.evaluator = DigitsEvaluator()

    def score(self, model_file: Path, sampling_seed: int) -> dict[str, Any]:
        from switchdit_dist import load_model
        from switchdit_dist.eval.command import check_digits_model
        from switchdit_dist.sampling.generate import SamplingConfig, sample_class_conditional

        s = self.settings
        config = SamplingConfig(
            steps=s.sampling_steps,
            sampler=s.sampler,
            cfg_scale=s.cfg_scale,
            seed=sampling_seed,
            batch_size=s.batch_size,
        )
        model = load_model(model_file, device="cpu")
        check_digits_model(model, str(model_file), s.cfg_scale)
        labels = torch.arange(NUM_DIGIT_CLASSES).repeat_interleave(s.samples // NUM_DIGIT_CLASSES)
        start = time.perf_counter()
        images = sample_class_conditional(model, labels, config, device="cpu")
        sampled = time.perf_counter()
        scores = self.evaluator.score(images, labels)
        return {
            "model_file": str(model_file),
            "sampler": s.sampler,
            "sampling_steps": s.sampling_steps,
            "cfg_scale": s.cfg_scale,
            "batch_size": s.batch_size,
            "sampling_seed": sampling_seed,
            "sampling_seconds": round(sampled - start, 2),
            "scoring_seconds": round(time.perf_counter() - sampled, 2),
            **scores.to_dict(),
        }
