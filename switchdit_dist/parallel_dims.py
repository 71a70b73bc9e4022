"""The parallel layout of a training job and its rules, in one place.

A job runs ``world_size`` ranks, all of them data-parallel. Expert-parallel groups are
``ep_size`` consecutive ranks; each holds ``num_experts / ep_size`` experts of every block, and
the ranks holding the same experts form the expert-data-parallel groups
(``world_size / ep_size`` ranks each). A rank runs ``micro_batch`` samples per forward;
accumulation makes up the global batch.

Config validation, ``switchdit plan``, ``switchdit submit``, the trainer and the MoE layers
check and derive these numbers here, so a rule is written once. Messages name the settings as
the caller's user typed them (config keys, or ``plan``'s flags: ``Spelling``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from switchdit_dist.errors import UserError


class LayoutError(UserError, ValueError):
    """A layout rule is broken; the message names the settings and what would be accepted. A
    UserError for the commands, a ValueError for the library's callers (the MoE layers)."""


@dataclass(frozen=True)
class Spelling:
    """How messages name the settings (``{}`` is the value)."""

    ep_size: str = "parallel.ep_size={}"
    num_experts: str = "model.num_experts={}"
    global_batch: str = "train.global_batch={}"
    micro_batch: str = "train.micro_batch"
    moe_model: str = "model.arch=switch-dit"


CONFIG_KEYS = Spelling()
PLAN_FLAGS = Spelling(
    ep_size="ep-size {}",
    num_experts="num_experts={}",
    global_batch="global batch {}",
    micro_batch="micro-batch",
    moe_model="Switch-DiT",
)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def num_local_experts(num_experts: int, ep_size: int) -> int:
    """Experts per rank of an expert-parallel group; raises LayoutError when they do not split evenly."""
    if ep_size < 1 or num_experts % ep_size:
        raise LayoutError(
            f"num_experts={num_experts} must be divisible by the expert-parallel size ep_size={ep_size}"
        )
    return num_experts // ep_size


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    ep_size: int = 1
    num_experts: int = 0  # 0: a dense model (DiT)
    micro_batch: int = 1
    global_batch: int | None = None  # None: one micro-batch per rank

    @classmethod
    def from_config(cls, config: Any, world_size: int) -> ParallelDims:
        m = config.model
        return cls(
            world_size=world_size,
            ep_size=config.parallel.ep_size,
            num_experts=m.num_experts if m.is_moe else 0,
            micro_batch=config.train.micro_batch,
            global_batch=config.train.global_batch,
        )

    # --- derived sizes ------------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def data_parallel(self) -> int:
        return self.world_size

    @property
    def expert_data_parallel(self) -> int:
        return self.world_size // self.ep_size

    @property
    def num_local_experts(self) -> int:
        return num_local_experts(self.num_experts, self.ep_size) if self.is_moe else 0

    @property
    def per_forward(self) -> int:
        """Samples in one forward pass of all ranks together."""
        return self.micro_batch * self.world_size

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.per_forward if self.global_batch else 1

    # --- rules --------------------------------------------------------------------------------

    def check(self, spell: Spelling = CONFIG_KEYS, world: str = "") -> None:
        """Every rule; ``world`` says where the world size came from (appended to its messages)."""
        ep = spell.ep_size.format(self.ep_size)
        if self.ep_size < 1:
            raise LayoutError(f"{ep}: expected >= 1")
        if self.is_moe:
            if self.num_experts % self.ep_size:
                raise LayoutError(
                    f"{ep} does not divide {spell.num_experts.format(self.num_experts)}; "
                    f"choose an expert-parallel size among {divisors(self.num_experts)}"
                )
        elif self.ep_size != 1:
            raise LayoutError(f"{ep} needs a mixture-of-experts model ({spell.moe_model})")
        where = f" {world}" if world else ""
        if self.world_size % self.ep_size:
            raise LayoutError(
                f"{ep} does not divide the world size {self.world_size}{where}; "
                f"use a world size that is a multiple of {self.ep_size}"
            )
        if self.micro_batch < 1:
            raise LayoutError(f"{spell.micro_batch}: expected >= 1, got {self.micro_batch}")
        if self.global_batch is not None and self.global_batch % self.per_forward:
            batch = spell.global_batch.format(self.global_batch)
            if self.global_batch % self.world_size:
                raise LayoutError(f"{batch} is not divisible by the data-parallel size {self.world_size}")
            raise LayoutError(
                f"{batch} is not a multiple of {spell.micro_batch} x data-parallel size "
                f"= {self.micro_batch} x {self.world_size} = {self.per_forward}"
            )

    def check_nodes(self, ranks_per_node: int, spell: Spelling = CONFIG_KEYS) -> str | None:
        """Expert-parallel groups lie inside one node or span whole nodes, never part of one.
        Returns a warning for groups that span nodes: their all-to-all then crosses the network."""
        ep = spell.ep_size.format(self.ep_size)
        if self.ep_size > ranks_per_node:
            if self.ep_size % ranks_per_node:
                raise LayoutError(
                    f"{ep} is not a multiple of the {ranks_per_node} ranks per node: some "
                    f"expert-parallel group would hold part of a node; use a multiple of {ranks_per_node}"
                )
            return (
                f"{ep} is larger than the {ranks_per_node} ranks per node: each expert-parallel group "
                f"spans {self.ep_size // ranks_per_node} nodes, so every MoE layer's all-to-all "
                "crosses the network (`switchdit plan` estimates its cost)"
            )
        if ranks_per_node % self.ep_size:
            raise LayoutError(
                f"{ranks_per_node} ranks per node is not a multiple of {ep}: some "
                f"expert-parallel group would span two nodes; use a multiple of {self.ep_size} per node"
            )
        return None

    def ep_groups(self) -> list[range]:
        """The expert-parallel groups' ranks."""
        return [range(start, start + self.ep_size) for start in range(0, self.world_size, self.ep_size)]
