"""Moving a block's experts to the samples instead of the samples to the experts.

Switch-DiT's linear experts are small (D x D each) next to the tokens that token dispatch moves
(B * L * D * k values per direction). When the experts are the smaller message, every EP rank
all-gathers the group's experts for the forward, mixes them per sample locally
(``models.experts.mixed_linear``) and, in backward, reduce-scatters the experts' gradients back to
their owners: each owner gets the sum of every EP rank's contribution, as token dispatch gives it.
The experts stay DeepSpeed expert parameters on their owners (reduced over the expert-data-
parallel group as with token dispatch), and the compute is local, so skewed routing costs no rank
more than another.

When to do so is ``switchdit_dist.expert_comm``'s cost model (``parallel.expert_comm``).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


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
