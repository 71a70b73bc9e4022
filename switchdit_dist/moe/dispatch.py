"""Dropless, permutation-based dispatch of whole samples to expert-parallel ranks.

Switch-DiT routes per sample (its gate sees only the timestep), so a (sample, slot) pair moves
as one contiguous [L, D] block. For one MoE layer call:

1. ``plan_dispatch``: sort the B*k pairs by destination expert (experts are placed in contiguous
   runs per rank, so this also groups them by rank), count pairs per expert and swap the counts
   with one small equal-split ``all_to_all_single``. The split sizes are host integers, so this
   reads the counts back from the device; a caller that already knows every rank's counts (the
   training step, which derives them from the timesteps once per step) passes them as
   ``expert_counts`` and the plan is made without a count exchange or a device read.
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

from switchdit_dist.parallel_dims import num_local_experts


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


def plan_dispatch(
    expert_index: torch.Tensor,
    num_experts: int,
    ep_size: int = 1,
    group=None,
    *,
    expert_counts: torch.Tensor | None = None,
    ep_rank: int = 0,
) -> DispatchPlan:
    """Sort the pairs of ``expert_index`` [B, k] by expert and swap per-expert counts with the EP group.

    Experts are placed in contiguous runs: EP rank r holds global experts
    ``r * num_local_experts ... (r + 1) * num_local_experts - 1``.

    ``expert_counts`` (host int tensor [ep_size, num_experts]): row r counts EP rank r's pairs per
    expert in this call, row ``ep_rank`` being this rank's. With it nothing is exchanged or read
    from the device; the caller vouches that its own row matches ``expert_index``.
    """
    if expert_index.dim() != 2:
        raise ValueError(f"expert_index must be [batch, k], got shape {tuple(expert_index.shape)}")
    num_local = num_local_experts(num_experts, ep_size)
    flat = expert_index.reshape(-1).long()
    if expert_counts is None:
        send_counts, recv_counts = _exchange_counts(flat, num_experts, ep_size, group)
    else:
        send_counts, recv_counts = _given_counts(expert_counts, flat.numel(), num_experts, ep_size, ep_rank)
    pair_order = torch.argsort(flat, stable=True)
    pair_position = torch.empty_like(pair_order)
    pair_position[pair_order] = torch.arange(pair_order.numel(), device=pair_order.device)
    return DispatchPlan(
        top_k=expert_index.shape[1],
        num_local_experts=num_local,
        pair_order=pair_order,
        pair_position=pair_position,
        send_splits=send_counts.reshape(ep_size, num_local).sum(1).tolist(),
        recv_splits=recv_counts.reshape(ep_size, num_local).sum(1).tolist(),
        chunk_sizes=recv_counts.tolist(),
        group=group,
    )


def _exchange_counts(
    flat: torch.Tensor, num_experts: int, ep_size: int, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts from the routes themselves: checked, counted, swapped with the group, on the host."""
    if flat.numel():
        low, high = torch.stack(torch.aminmax(flat)).tolist()
        if low < 0 or high >= num_experts:
            raise ValueError(f"expert_index values must lie in [0, {num_experts}), got min {low} max {high}")
    send_counts = torch.bincount(flat, minlength=num_experts)
    if ep_size > 1:
        # Equal splits: rank r receives, from every source, the counts of its own local experts.
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        return send_counts.cpu(), recv_counts.cpu()
    send_counts = send_counts.cpu()
    return send_counts, send_counts


def _given_counts(
    counts: torch.Tensor, num_pairs: int, num_experts: int, ep_size: int, ep_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's send counts and, per source rank, its local experts' counts, from the group's table."""
    if counts.device.type != "cpu" or tuple(counts.shape) != (ep_size, num_experts):
        raise ValueError(
            f"expert_counts must be a host tensor [ep_size={ep_size}, num_experts={num_experts}], got "
            f"{tuple(counts.shape)} on {counts.device}"
        )
    send_counts = counts[ep_rank].long()
    if int(send_counts.sum()) != num_pairs:
        raise ValueError(
            f"expert_counts of EP rank {ep_rank} add up to {int(send_counts.sum())} but expert_index has "
            f"{num_pairs} (sample, slot) pairs"
        )
    num_local = num_experts // ep_size
    recv_counts = counts[:, ep_rank * num_local : (ep_rank + 1) * num_local].long().reshape(-1)
    return send_counts, recv_counts
