"""Experts of a Switch-DiT block, single device.

The contract every expert implementation follows (this one, and the expert-parallel layer in
``switchdit_dist.moe``)::

    experts(x, expert_index, expert_weight) -> y
    x: [B, L, D]; expert_index: [B, k] long; expert_weight: [B, k]
    y[b] = sum_j expert_weight[b, j] * expert_{expert_index[b, j]}(x[b])

Routing is per sample (Switch-DiT's gate sees only the timestep), so every token of a sample
goes to the same experts.
"""

from __future__ import annotations

import torch
from torch import nn

EXPERT_KINDS = ("linear", "mlp")


def make_expert(kind: str, dim: int, mlp_ratio: float = 4.0) -> nn.Module:
    """One expert of the given kind, initialised by :func:`init_expert_`."""
    if kind == "linear":
        expert = nn.Linear(dim, dim, bias=True)
    elif kind == "mlp":
        hidden = int(dim * mlp_ratio)
        expert = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
    else:
        raise ValueError(f"expert kind must be one of {EXPERT_KINDS}, got {kind!r}")
    init_expert_(expert)
    return expert


@torch.no_grad()
def init_expert_(expert: nn.Module) -> None:
    """Initialise so that the expert's output is exactly zero (Switch-DiT starts as DiT).

    ``linear``: the paper's D->D layer, weight and bias zero. ``mlp``: the first layer is
    xavier-initialised and the second zeroed, so the output is zero but both layers get gradients.
    """
    if isinstance(expert, nn.Linear):
        nn.init.zeros_(expert.weight)
        nn.init.zeros_(expert.bias)
        return
    first, last = expert[0], expert[-1]
    nn.init.xavier_uniform_(first.weight)
    nn.init.zeros_(first.bias)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


class LocalExperts(nn.Module):
    """All E experts on one device; the reference the expert-parallel layer is tested against."""

    def __init__(self, dim: int, num_experts: int, kind: str = "linear", mlp_ratio: float = 4.0):
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList(make_expert(kind, dim, mlp_ratio) for _ in range(num_experts))

    def reset_expert_parameters(self) -> None:
        for expert in self.experts:
            init_expert_(expert)

    def forward(
        self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sample, slot = torch.nonzero(expert_index == e, as_tuple=True)
            if sample.numel() == 0:
                continue
            y = expert(x[sample]) * expert_weight[sample, slot].to(x.dtype)[:, None, None]
            out = out.index_add(0, sample, y)
        return out
