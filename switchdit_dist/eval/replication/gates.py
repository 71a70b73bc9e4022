"""The learned routing of one Switch-DiT: router probabilities over every timestep, per block.

Switch-DiT's router sees only the timestep embedding, so [T, depth, E] probabilities describe the
routing completely; the summary names each block's most probable expert in each tenth of [0, T).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from switchdit_dist.train.metrics import NUM_BUCKETS


@dataclass(frozen=True)
class GateSummary:
    model_file: str
    # [block][bucket] -> (expert, its mean probability over the bucket's timesteps)
    top_expert: list[list[tuple[int, float]]]


def gate_probs(model_file: Path, num_timesteps: int = 1000) -> torch.Tensor:
    from switchdit_dist import load_model

    model = load_model(model_file, device="cpu").eval()
    return model.gate_probs_for_timesteps(torch.arange(num_timesteps)).float()


def summarize(model_file: Path, probs: torch.Tensor) -> GateSummary:
    T, depth, _ = probs.shape
    top = []
    for block in range(depth):
        row = []
        for b in range(NUM_BUCKETS):
            mean = probs[b * T // NUM_BUCKETS : (b + 1) * T // NUM_BUCKETS, block].mean(0)
            row.append((int(mean.argmax()), float(mean.max())))
        top.append(row)
    return GateSummary(str(model_file), top)


def save_heatmap(probs: torch.Tensor, path: Path) -> None:
    """The trainer's gate image (one band per block, one row per expert, t=0 on the left)."""
    from PIL import Image

    from switchdit_dist.train.metrics import gate_image

    Image.fromarray(gate_image(probs)).save(path)
