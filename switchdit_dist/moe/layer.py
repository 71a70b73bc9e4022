"""The expert-parallel experts module of a Switch-DiT block: route -> dispatch -> experts -> combine.

``ExpertParallelMoE`` follows the experts contract of ``switchdit_dist.models.experts``
(``experts(x, expert_index, expert_weight) -> y``) and is a ``deepspeed.moe.layer.MoE`` so that the
DeepSpeed engine treats it as a native MoE layer: ``has_moe_layers``, MoE parameter-group checks,
expert-parallel group creation and per-expert checkpoint files all key on that ``isinstance``.
``MoE.__init__`` is not called because it would build DeepSpeed's token gate and capacity-padded
``MOELayer``; the attributes the engine reads are set here instead, and ``deepspeed_moe`` holds
only the experts (``deepspeed_moe.experts.deepspeed_experts.{i}``), the names the engine's
checkpoint code rewrites between local and global expert ids.

Two ways to bring samples and experts together (``expert_comm``): ``tokens`` moves each (sample,
slot) block to its expert's rank and back (``dispatch``); ``weights`` gathers the group's linear
experts to every rank and mixes them per sample locally (``weight_exchange``), which moves fewer
bytes when the experts are smaller than the tokens and makes skewed routing free.

Routing comes from the model (Switch-DiT's timestep router), so this layer has no gate and no
parameters other than expert parameters. The training step knows the routes of a whole step from
its timesteps and passes every EP rank's samples per expert as ``expert_counts``; called without
them the layer counts and exchanges them itself (one device read and one count exchange per call).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from switchdit_dist.expert_comm import check_expert_comm
from switchdit_dist.models.experts import LocalExperts, mix_routed_experts
from switchdit_dist.models.switch_dit import ExpertsFactory, SwitchDiTConfig
from switchdit_dist.moe.dispatch import plan_dispatch
from switchdit_dist.moe.experts import ExpertShard
from switchdit_dist.moe.weight_exchange import gather_experts
from switchdit_dist.parallel_dims import num_local_experts
from switchdit_dist.train import deepspeed_adapter as ds


class ExpertParallelMoE(MoE):
    """E experts sharded over an expert-parallel group of ``ep_size`` ranks (E / ep_size each).

    The EP group comes from DeepSpeed: ``deepspeed.initialize`` calls ``set_deepspeed_parallelism``
    on every module, which creates (or reuses) the ``ep_size_{ep_size}`` groups in
    ``deepspeed.utils.groups``. Without the engine, call ``set_deepspeed_parallelism()`` after
    ``deepspeed.init_distributed()``, or hand a torch process group to ``set_process_group``.
    With ``ep_size == 1`` no process group is needed.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        ep_size: int = 1,
        kind: str = "linear",
        mlp_ratio: float = 4.0,
        expert_comm: str = "tokens",
    ):
        nn.Module.__init__(self)
        num_local = num_local_experts(num_experts, ep_size)
        check_expert_comm(expert_comm, kind, allowed=("tokens", "weights"))  # auto is resolved before
        self.expert_comm = expert_comm
        # Attributes DeepSpeed's engine and checkpointing read from a MoE layer.
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_local
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.deepspeed_moe = ExpertShard(dim, self.num_local_experts, self.expert_group_name, kind, mlp_ratio)
        self.ep_group = None

    # --- process groups -------------------------------------------------------------------

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Create DeepSpeed's expert/expert-data parallel groups for ``ep_size`` if missing, and use them."""
        if not ds.has_expert_groups(self.expert_group_name):
            ds.create_expert_groups(self.ep_size, use_data_before_expert_parallel_)
        self._set_ep_group(ds.expert_parallel_group(self.expert_group_name))

    def _set_ep_group(self, ep_group) -> None:
        size = dist.get_world_size(ep_group)
        if size != self.ep_size:
            raise ValueError(
                f"expert-parallel group has {size} ranks, this layer was built for ep_size={self.ep_size}"
            )
        self.ep_group = ep_group

    def set_process_group(self, ep_group) -> None:
        """Use a torch process group of ``ep_size`` ranks as the expert-parallel group."""
        self._set_ep_group(ep_group)

    @property
    def ep_rank(self) -> int:
        if self.ep_size == 1:
            return 0
        self._require_group()
        return dist.get_rank(self.ep_group)

    @property
    def global_expert_ids(self) -> range:
        """Global ids of this rank's experts, in local order."""
        first = self.ep_rank * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def _require_group(self) -> None:
        if self.ep_group is None:
            # torch would otherwise default to the world group and silently shard over all ranks.
            raise RuntimeError(
                f"ExpertParallelMoE with ep_size={self.ep_size} has no expert-parallel group: pass the model "
                "to deepspeed.initialize, or call set_deepspeed_parallelism() / set_process_group(group)"
            )

    # --- parameters -----------------------------------------------------------------------

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.local_experts

    def reset_expert_parameters(self) -> None:
        self.deepspeed_moe.reset_parameters()

    @torch.no_grad()
    def load_local_experts(self, reference: LocalExperts) -> None:
        """Copy this rank's experts from a single-device ``LocalExperts`` holding all E experts."""
        if reference.num_experts != self.num_experts:
            raise ValueError(f"reference has {reference.num_experts} experts, this layer {self.num_experts}")
        for local, global_id in zip(self.local_experts, self.global_expert_ids):
            local.load_state_dict(reference.experts[global_id].state_dict())

    # --- forward --------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        expert_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, L, D], expert_index [B, k], expert_weight [B, k] ->
        y[b] = sum_j expert_weight[b, j] * expert_{expert_index[b, j]}(x[b]).

        ``expert_counts``: host int tensor [ep_size, num_experts], row r = EP rank r's (sample, slot)
        pairs per expert in this call (see ``plan_dispatch``)."""
        if self.ep_size > 1:
            self._require_group()
        if self.expert_comm == "weights":
            return self._forward_by_weights(x, expert_index, expert_weight)
        plan = plan_dispatch(
            expert_index,
            self.num_experts,
            self.ep_size,
            self.ep_group,
            expert_counts=expert_counts,
            ep_rank=self.ep_rank if expert_counts is not None else 0,
        )
        received = plan.dispatch(x)
        expert_out = self.deepspeed_moe(received, plan.chunk_sizes)
        return plan.combine(expert_out, expert_weight)

    def _forward_by_weights(
        self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor
    ) -> torch.Tensor:
        # expert_index is not checked on the host here: that would read the device in every layer.
        local = self.local_experts
        weight = gather_experts(torch.stack([e.weight for e in local]), self.ep_group, self.ep_size)
        bias = gather_experts(torch.stack([e.bias for e in local]), self.ep_group, self.ep_size)
        return mix_routed_experts(x, expert_index, expert_weight, weight, bias)


def expert_parallel_layout(module: nn.Module) -> tuple[int, int, object] | None:
    """``(ep_size, ep_rank, ep_group)`` shared by the model's expert-parallel layers; None without any."""
    for sub in module.modules():
        if isinstance(sub, ExpertParallelMoE):
            return sub.ep_size, sub.ep_rank, sub.ep_group
    return None


def expert_parallel_factory(ep_size: int, expert_comm: str = "tokens") -> ExpertsFactory:
    """The ``experts_factory`` of ``SwitchDiT`` that shards each block's experts over ``ep_size``
    ranks; ``expert_comm``: ``tokens`` or ``weights`` (see ``switchdit_dist.expert_comm``)."""

    def make(config: SwitchDiTConfig, block_index: int) -> nn.Module:
        return ExpertParallelMoE(
            config.hidden_size,
            config.num_experts,
            ep_size,
            config.expert_kind,
            config.expert_mlp_ratio,
            expert_comm,
        )

    return make
