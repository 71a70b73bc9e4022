"""Experts of a Switch-DiT block, single device.

The contract every expert implementation follows (this one, and the expert-parallel layer in
``switchdit_dist.moe``)::

    experts(x, expert_index, expert_weight) -> y
    x: [B, L, D]; expert_index: [B, k] long; expert_weight: [B, k]
    y[b] = sum_j expert_weight[b, j] * expert_{expert_index[b, j]}(x[b])

Routing is per sample (Switch-DiT's gate sees only the timestep), so every token of a sample
goes to the same experts. For linear experts that allows *weight mixing*: with ``W_e, b_e`` the
experts' weights and ``c[b, e]`` the sample's weight of expert e (0 when not routed there),

    y[b] = sum_e c[b, e] (x[b] W_e^T + b_e) = x[b] (sum_e c[b, e] W_e)^T + sum_e c[b, e] b_e

one matmul per token with the sample's mixed weight instead of k (``mixed_linear``).
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


def route_coefficients(
    expert_index: torch.Tensor, expert_weight: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """``c`` [B, E]: each sample's weight of every expert, 0 where it is not routed (differentiable
    in ``expert_weight``)."""
    coeff = expert_weight.new_zeros(expert_weight.shape[0], num_experts)
    return coeff.scatter_add(1, expert_index, expert_weight)


class _MixedLinear(torch.autograd.Function):
    """``y[b] = x[b] M[b]^T + c[b] @ bias`` with ``M[b] = sum_e c[b, e] W[e]``. Written by hand so
    that the [B, D, D] mixed weights are not kept for backward (autograd would save them: B*D*D
    values per layer, which at B=32, D=1152 is 170 MB in fp32); backward recomputes them at the
    cost of the mixing, E*B*D*D multiply-adds against the B*L*D*D of the matmul."""

    # The mixing and its gradients are plain matrix products over flattened [E, D_out * D_in]
    # weights (einsum would permute and copy the weights to reach the same mm).

    @staticmethod
    def forward(ctx, x, coeff, weight, bias):
        ctx.save_for_backward(x, coeff, weight, bias)
        return torch.baddbmm((coeff @ bias).unsqueeze(1), x, _mix(coeff, weight).transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_y):
        x, coeff, weight, bias = ctx.saved_tensors
        need_x, need_c, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_c = grad_w = grad_b = None
        grad_rows = grad_y.sum(1)  # [B, D_out]: the bias term's gradient per sample
        if need_x:
            grad_x = torch.bmm(grad_y, _mix(coeff, weight))
        if need_c or need_w:
            grad_mixed = torch.bmm(grad_y.transpose(1, 2), x).flatten(1)  # [B, D_out * D_in]
            if need_c:
                grad_c = torch.addmm(grad_rows @ bias.T, grad_mixed, weight.flatten(1).T)
            if need_w:
                grad_w = (coeff.T @ grad_mixed).view_as(weight)
        if need_b:
            grad_b = coeff.T @ grad_rows
        return grad_x, grad_c, grad_w, grad_b


def _mix(coeff: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, D_out, D_in]: every sample's mixed weight sum_e coeff[b, e] weight[e]."""
    return (coeff @ weight.flatten(1)).view(coeff.shape[0], *weight.shape[1:])


def mixed_linear(
    x: torch.Tensor, coeff: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """x [B, L, D_in], coeff [B, E], weight [E, D_out, D_in], bias [E, D_out] -> [B, L, D_out]:
    every sample through the mixture of linear experts its coefficients give."""
    return _MixedLinear.apply(x, coeff.to(x.dtype), weight, bias)


def mix_routed_experts(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """The experts contract by weight mixing, given all E linear experts stacked (weight [E, D, D],
    bias [E, D])."""
    coeff = route_coefficients(expert_index, expert_weight, weight.shape[0])
    return mixed_linear(x, coeff, weight, bias)


class LocalExperts(nn.Module):
    """All E experts on one device; the reference the expert-parallel layer is tested against.
    ``mix``: linear experts by weight mixing (``mixed_linear``) instead of one matmul per route."""

    def __init__(
        self, dim: int, num_experts: int, kind: str = "linear", mlp_ratio: float = 4.0, mix: bool = False
    ):
        super().__init__()
        if mix and kind != "linear":
            raise ValueError(
                f"weight mixing needs linear experts, not {kind!r} ones (their sum is not linear)"
            )
        self.num_experts = num_experts
        self.mix = mix
        self.experts = nn.ModuleList(make_expert(kind, dim, mlp_ratio) for _ in range(num_experts))

    def reset_expert_parameters(self) -> None:
        for expert in self.experts:
            init_expert_(expert)

    def forward(
        self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor
    ) -> torch.Tensor:
        if self.mix:
            weight = torch.stack([e.weight for e in self.experts])
            bias = torch.stack([e.bias for e in self.experts])
            return mix_routed_experts(x, expert_index, expert_weight, weight, bias)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sample, slot = torch.nonzero(expert_index == e, as_tuple=True)
            if sample.numel() == 0:
                continue
            y = expert(x[sample]) * expert_weight[sample, slot].to(x.dtype)[:, None, None]
            out = out.index_add(0, sample, y)
        return out
