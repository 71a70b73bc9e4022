"""DeepSpeed's stock ``MOELayer`` driven by Switch-DiT routing: the baseline our dispatch is tested
and benchmarked against.

``MOELayer`` takes its routing from a gate with ``TopKGate``'s interface: called as
``gate(tokens, used_token, sparse_routes=True, use_tutel)`` it returns
``(aux_loss, capacity, num_experts, indices [k, S], locations [k, S], gates [k, S], expert_counts)``,
where ``locations`` is each route's slot in its expert's capacity buffer. ``FixedRoutingGate``
returns routing decided elsewhere (per sample, spread over the sample's tokens) with the
``drop_tokens=False`` capacity rule of the stock gates: the busiest expert's load over the EP group,
so every expert's buffer is padded to it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import MOELayer
from torch import nn

from switchdit_dist.models.experts import LocalExperts, make_expert
from switchdit_dist.parallel_dims import num_local_experts


class FixedRoutingGate(nn.Module):
    """A ``TopKGate`` stand-in that returns the per-sample routing set by ``set_routing``."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.ep_group = None
        self._routing: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def set_routing(
        self, expert_index: torch.Tensor, expert_weight: torch.Tensor, tokens_per_sample: int
    ) -> None:
        self._routing = (expert_index, expert_weight, tokens_per_sample)

    def forward(
        self, tokens: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False
    ):
        if self._routing is None:
            raise RuntimeError("FixedRoutingGate: call set_routing() before the layer's forward")
        if not sparse_routes or used_token is not None:
            raise ValueError("FixedRoutingGate supports only sparse routes and no used_token mask")
        expert_index, expert_weight, length = self._routing
        index = expert_index.long().repeat_interleave(length, dim=0).t().contiguous()  # [k, S]
        gates = expert_weight.float().repeat_interleave(length, dim=0).t().contiguous()  # [k, S]
        k, num_tokens = index.shape
        if num_tokens != tokens.shape[0]:
            raise ValueError(f"routing covers {num_tokens} tokens, the layer got {tokens.shape[0]}")
        # Slot of each route in its expert's buffer: routes of slot 0 first, then slot 1, as the
        # stock top-2 gate orders them.
        one_hot = F.one_hot(index.reshape(-1), self.num_experts)
        locations = ((one_hot.cumsum(0) - 1) * one_hot).sum(1).view(k, num_tokens)
        expert_counts = one_hot.sum(0)
        capacity = expert_counts.max()
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        aux_loss = tokens.new_zeros(())
        return aux_loss, capacity, self.num_experts, index.int(), locations.int(), gates, expert_counts


class DeepSpeedStockExperts(nn.Module):
    """The experts contract (``experts(x, expert_index, expert_weight)``) on DeepSpeed's ``MOELayer``
    with ``drop_tokens=False`` semantics."""

    def __init__(
        self, dim: int, num_experts: int, ep_size: int = 1, kind: str = "linear", mlp_ratio: float = 4.0
    ):
        super().__init__()
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts(num_experts, ep_size)
        group_name = f"ep_size_{ep_size}"
        self.gate = FixedRoutingGate(num_experts)
        experts = Experts(make_expert(kind, dim, mlp_ratio), self.num_local_experts, group_name)
        self.moe_layer = MOELayer(self.gate, experts, group_name, ep_size, self.num_local_experts)

    def set_process_group(self, ep_group) -> None:
        self.moe_layer._set_ep_group(ep_group)

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe_layer.experts.deepspeed_experts

    @torch.no_grad()
    def load_local_experts(self, reference: LocalExperts, ep_rank: int = 0) -> None:
        first = ep_rank * self.num_local_experts
        for i, local in enumerate(self.local_experts):
            local.load_state_dict(reference.experts[first + i].state_dict())

    def forward(
        self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor
    ) -> torch.Tensor:
        self.gate.set_routing(expert_index, expert_weight, x.shape[1])
        return self.moe_layer(x, None)
