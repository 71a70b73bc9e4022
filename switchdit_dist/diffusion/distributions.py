"""Gaussian helpers for the variational bound: KL, discretised log-likelihood, per-sample means."""

from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Phi(x) that the DDPM decoder likelihood is defined with."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, bin_width: float = 2.0 / 255.0
) -> torch.Tensor:
    """log P(x) elementwise, in nats, for data in [-1, 1] quantised into bins of ``bin_width``.

    The outermost bins extend to -inf / +inf, so values at the edges (|x| > 0.999) take the
    whole tail. Probabilities are floored at 1e-12 to keep the log finite.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + bin_width / 2))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - bin_width / 2))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin))
