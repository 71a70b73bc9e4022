"""This rank's share of a layer's experts, held the way DeepSpeed's MoE machinery expects.

The experts sit in a ``deepspeed.moe.experts.Experts``: its parameters carry ``allreduce=False``
and ``group_name``, so the engine reduces their gradients over the expert-data-parallel group only,
puts them in their own ZeRO partitions, and writes one checkpoint file per expert
(``...deepspeed_moe.experts.deepspeed_experts.{id}...`` keys).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.experts import Experts
from torch import nn

from switchdit_dist.models.experts import init_expert_, make_expert
from switchdit_dist.moe.grouped import grouped_mlp, grouped_mm_supported


class ExpertShard(nn.Module):
    """The ``num_local_experts`` experts of one EP rank, run on contiguous runs of sample blocks."""

    def __init__(
        self, dim: int, num_local_experts: int, group_name: str, kind: str = "linear", mlp_ratio: float = 4.0
    ):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.kind = kind
        # MLP experts as grouped matmuls: None = where supported (CUDA, bf16, Hopper), else the loop;
        # True/False force either (tests compare them, ``bench moe`` times them).
        self.grouped: bool | None = None
        self.experts = Experts(make_expert(kind, dim, mlp_ratio), num_local_experts, group_name)

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.experts.deepspeed_experts

    def forward(self, blocks: torch.Tensor, chunk_sizes: list[int]) -> torch.Tensor:
        """``blocks`` [N, L, D] in runs of ``chunk_sizes``; run i belongs to local expert
        ``i % num_local_experts`` (runs arrive grouped by source rank, then by local expert)."""
        if self.kind == "mlp" and sum(chunk_sizes) > 0:
            grouped = grouped_mm_supported(blocks) if self.grouped is None else self.grouped
            if grouped:
                return grouped_mlp(blocks, chunk_sizes, self.local_experts)
        outputs = []
        for i, run in enumerate(blocks.split(chunk_sizes)):
            # Every expert runs, on an empty run too: its parameters then get (zero) gradients on
            # every rank, which keeps the data-parallel gradient reduction of replicated experts
            # identical across ranks, and the output stays attached to the received tensor, so the
            # backward all-to-all runs on every rank even when nothing arrived.
            outputs.append(self.local_experts[i % self.num_local_experts](run))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise like ``init_expert_``, with a random stream distinct per process.

        One draw from the global generator keeps every rank's stream in step (the rest of the model
        is initialised identically everywhere); the local experts then draw from a generator salted
        with the process rank, so experts on different EP ranks do not start as copies of each other
        (expert-data-parallel replicas are made equal by the engine's broadcast).
        """
        seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        salt = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919 * salt)
            for expert in self.local_experts:
                init_expert_(expert)
