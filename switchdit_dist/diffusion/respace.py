"""Timestep respacing (ADM): sample with a subset of the training steps.

Keeping steps S = {s_0 < s_1 < ...} of the original chain defines a new, shorter chain whose
betas are ``1 - abar[s_i] / abar[s_{i-1}]``, so its alphas_cumprod are exactly the original
ones at the kept steps. The network was trained on original timesteps, so a respaced diffusion
hands it ``timestep_map[t]`` instead of the new index ``t``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from switchdit_dist.diffusion.gaussian import GaussianDiffusion
from switchdit_dist.errors import UserError


def space_timesteps(num_timesteps: int, spacing: str | Iterable[int]) -> set[int]:
    """The original steps to keep.

    ``"ddimN"``: N steps at a fixed integer stride from 0 (DDIM's spacing; the stride must
    divide into exactly N steps). ``"a,b,c"`` (or a list of ints): the chain is cut into equal
    sections and section i keeps a_i evenly spaced steps, its first and last included.
    """
    if isinstance(spacing, str):
        text = spacing.strip()
        if text.startswith("ddim"):
            try:
                wanted = int(text[len("ddim") :])
            except ValueError:
                raise UserError(
                    f"timestep_respacing {spacing!r}: expected 'ddim<N>', e.g. 'ddim50'"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise UserError(
                f"timestep_respacing {spacing!r}: no integer stride gives exactly {wanted} "
                f"of {num_timesteps} steps"
            )
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise UserError(
                f"timestep_respacing {spacing!r}: expected '', 'ddim<N>' "
                "or comma-separated step counts like '250'"
            ) from None
    else:
        counts = [int(c) for c in spacing]
    if not counts or any(c < 1 for c in counts):
        raise UserError(f"timestep_respacing {spacing!r}: step counts must be positive integers")

    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise UserError(
                f"timestep_respacing {spacing!r}: section {i} has {size} steps, cannot keep {count}"
            )
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the kept steps of ``base_betas``; ``timestep_map[i]`` is the original
    index of new step i, and :meth:`model_timesteps` applies it."""

    def __init__(self, use_timesteps: Iterable[int], base_betas: np.ndarray, **kwargs):
        base = GaussianDiffusion(base_betas, **kwargs)
        kept = sorted(set(int(s) for s in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ValueError(
                f"use_timesteps must lie in [0, {base.num_timesteps}), got {kept[:3]}...{kept[-3:]}"
            )
        abar = base.alphas_cumprod[kept]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        self.original_num_timesteps = base.num_timesteps
        self.timestep_map = np.array(kept, dtype=np.int64)
        super().__init__(betas, **kwargs)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.timestep_map).to(t.device)[t.long()]
