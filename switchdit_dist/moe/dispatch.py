"""Dropless, permutation-based dispatch of whole samples to expert-parallel ranks.

Switch-DiT routes per sample (its gate sees only the timestep), so a (sample, slot) pair moves
as one contiguous [L, D] block. For one MoE layer call:

1. ``plan_dispatch``: sort the B*k pairs by destination expert (experts are placed in contiguous
   runs per rank, so this also groups them by rank), count pairs per expert and swap the counts
   with one small equal-split ``all_to_all_single``.
2. ``DispatchPlan.dispatch``: gather the pairs' sample blocks in that order and send them with
   one variable-size ``all_to_all_single``. The receiver gets, per source rank, one contiguous
   run per local expert.
3. the local experts run on those runs (see ``ExpertShard``);
4. ``DispatchPlan.combine``: one ``all_to_all_single`` back, then un-permute and take each
   sample's weighted sum over its k slots.

Nothing is padded: a rank sends and receives exactly the blocks its routing needs, also when every
sample picks the same expert or a rank receives nothing. With ``ep_size == 1`` the same plan runs
without any process group (the exchanges become identities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class _AllToAllVariable(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_output):
        grad = _exchange(grad_output, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad, None, None, None


def _exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


def all_to_all_variable(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None
) -> torch.Tensor:
    """Differentiable variable-size all-to-all: rank r sends ``x``'s i-th run of ``input_splits[i]``
    rows to rank i and receives ``output_splits[i]`` rows from rank i, concatenated by source rank."""
    return _AllToAllVariable.apply(x, output_splits, input_splits, group)


@dataclass
class DispatchPlan:
    """Where each (sample, slot) pair of one layer call goes, and how much arrives from where.

    ``pair_order[i]`` is the flat pair id (``sample * k + slot``) sent i-th; ``pair_position`` is
    its inverse. ``send_splits``/``recv_splits`` count sample blocks per EP rank; ``chunk_sizes``
    lists the received runs in arrival order, run ``i`` belonging to local expert
    ``i % num_local_experts``.
    """

    top_k: int
    num_local_experts: int
    pair_order: torch.Tensor
    pair_position: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    chunk_sizes: list[int]
    group: object = None

    @property
    def distributed(self) -> bool:
        return len(self.send_splits) > 1

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> the blocks this rank's experts must process, in ``chunk_sizes`` runs."""
        # Whole-sample blocks: one contiguous L*D copy per pair, no per-token gather.
        send = x.index_select(0, torch.div(self.pair_order, self.top_k, rounding_mode="floor"))
        if not self.distributed:
            return send
        return all_to_all_variable(send, self.recv_splits, self.send_splits, self.group)

    def combine(self, expert_out: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        """Expert outputs (same layout as ``dispatch`` returned) -> [B, L, D] weighted sums."""
        if self.distributed:
            expert_out = all_to_all_variable(expert_out, self.send_splits, self.recv_splits, self.group)
        batch, k = expert_weight.shape
        length, dim = expert_out.shape[1:]
        per_slot = expert_out.index_select(0, self.pair_position).view(batch, k, length * dim)
        weight = expert_weight.to(expert_out.dtype).unsqueeze(1)  # [B, 1, k]
        return torch.bmm(weight, per_slot).view(batch, length, dim)


def plan_dispatch(expert_index: torch.Tensor, num_experts: int, ep_size: int = 1, group=None) -> DispatchPlan:
    """Sort the pairs of ``expert_index`` [B, k] by expert and swap per-expert counts with the EP group.

    Experts are placed in contiguous runs: EP rank r holds global experts
    ``r * num_local_experts ... (r + 1) * num_local_experts - 1``.
    """
    if expert_index.dim() != 2:
        raise ValueError(f"expert_index must be [batch, k], got shape {tuple(expert_index.shape)}")
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}")
    num_local = num_experts // ep_size
    flat = expert_index.reshape(-1).long()
    if flat.numel():
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= num_experts:
            raise ValueError(f"expert_index values must lie in [0, {num_experts}), got min {low} max {high}")
    pair_order = torch.argsort(flat, stable=True)
    pair_position = torch.empty_like(pair_order)
    pair_position[pair_order] = torch.arange(pair_order.numel(), device=pair_order.device)
    send_counts = torch.bincount(flat, minlength=num_experts)
    if ep_size > 1:
        # Equal splits: rank r receives, from every source, the counts of its own local experts.
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
    else:
        recv_counts = send_counts
    return DispatchPlan(
        top_k=expert_index.shape[1],
        num_local_experts=num_local,
        pair_order=pair_order,
        pair_position=pair_position,
        send_splits=send_counts.view(ep_size, num_local).sum(1).tolist(),
        recv_splits=recv_counts.view(ep_size, num_local).sum(1).tolist(),
        chunk_sizes=recv_counts.tolist(),
        group=group,
    )
