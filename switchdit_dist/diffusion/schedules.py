"""Noise schedules: the betas of the forward process, float64 numpy arrays of length T."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from switchdit_dist.errors import UserError

NOISE_SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s 1e-4..2e-2 for T=1000, stretched by 1000/T so other T keep a similar curve (ADM)."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 2e-2, num_timesteps, dtype=np.float64)


def betas_from_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into per-step betas.

    beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped below 1 so the last step keeps
    a finite posterior.
    """
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    bars = np.array([alpha_bar(s) for s in steps], dtype=np.float64)
    return np.minimum(1.0 - bars[1:] / bars[:-1], max_beta)


def cosine_alpha_bar(s: float, offset: float = 0.008) -> float:
    """Improved DDPM's cosine schedule; the small offset keeps beta_0 from vanishing."""
    return math.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise UserError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return betas_from_alpha_bar(num_timesteps, cosine_alpha_bar)
    raise UserError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {name!r}")
