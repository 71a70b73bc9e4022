"""Moving a block's experts to the samples instead of the samples to the experts.

Switch-DiT's linear experts are small (D x D each) next to the tokens that token dispatch moves
(B * L * D * k values per direction). When the experts are the smaller message, every EP rank
all-gathers the group's experts for the forward, mixes them per sample locally
(``models.experts.mixed_linear``) and, in backward, reduce-scatters the experts' gradients back to
their owners: each owner gets the sum of every EP rank's contribution, as token dispatch gives it.
The experts stay DeepSpeed expert parameters on their owners (reduced over the expert-data-
parallel group as with token dispatch), and the compute is local, so skewed routing costs no rank
more than another.

``expert_comm_bytes`` is the cost model ``auto`` decides by and ``switchdit plan`` prints.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

EXPERT_COMMS = ("auto", "tokens", "weights")


class _GatherExperts(torch.autograd.Function):
    """All-gather along dim 0 over the EP group (rank order = global expert order); backward sums
    every rank's gradient of the gathered tensor and hands each owner its slice (reduce-scatter)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        local = local.contiguous()
        out = local.new_empty((world * local.shape[0], *local.shape[1:]))
        with warnings.catch_warnings():  # deprecated in torch 2.13 (all_gather_single); exists since 1.13
            warnings.simplefilter("ignore", FutureWarning)
            dist.all_gather_into_tensor(out, local, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        with warnings.catch_warnings():  # as above (reduce_scatter_single in torch 2.13)
            warnings.simplefilter("ignore", FutureWarning)
            dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_experts(local: torch.Tensor, group, ep_size: int) -> torch.Tensor:
    """[E_local, ...] on each EP rank -> [E, ...] everywhere, differentiable; identity at EP 1."""
    if ep_size == 1:
        return local
    return _GatherExperts.apply(local, group)


@dataclass(frozen=True)
class ExpertCommCost:
    """Values one EP rank sends per direction (forward; backward moves as many) in one layer."""

    tokens: int  # token dispatch: the rank's (sample, slot) blocks, (ep-1)/ep of them leave it
    weights: int  # weight gathering: the other ranks' experts come in, (ep-1)/ep of all E

    def choice(self, kind: str, ep_size: int) -> str:
        """What ``auto`` picks: weights for linear experts (they mix; at EP 1 nothing moves and
        one matmul replaces k) when they are no more bytes than the tokens; tokens otherwise."""
        if kind != "linear":
            return "tokens"
        return "weights" if ep_size == 1 or self.weights <= self.tokens else "tokens"


def expert_comm_bytes(
    num_experts: int, dim: int, micro_batch: int, tokens: int, top_k: int, ep_size: int, bytes_per_value: int
) -> ExpertCommCost:
    """The cost model: expected bytes per direction, with uniform routing for token dispatch."""
    leaving = (ep_size - 1) / ep_size
    token_values = micro_batch * top_k * tokens * dim * leaving
    weight_values = num_experts * (dim * dim + dim) * leaving
    return ExpertCommCost(int(token_values * bytes_per_value), int(weight_values * bytes_per_value))


def resolve_expert_comm(
    mode: str,
    kind: str,
    num_experts: int,
    dim: int,
    micro_batch: int,
    tokens: int,
    top_k: int,
    ep_size: int,
    bytes_per_value: int,
) -> str:
    """``tokens`` or ``weights`` for a layer, from ``parallel.expert_comm``."""
    if mode not in EXPERT_COMMS:
        raise ValueError(f"parallel.expert_comm must be one of {EXPERT_COMMS}, got {mode!r}")
    if mode == "weights" and kind != "linear":
        raise ValueError(f"parallel.expert_comm=weights needs linear experts, model.expert_kind is {kind!r}")
    if mode != "auto":
        return mode
    cost = expert_comm_bytes(num_experts, dim, micro_batch, tokens, top_k, ep_size, bytes_per_value)
    return cost.choice(kind, ep_size)
