"""Local <-> global names of expert parameters.

On a rank, DeepSpeed's expert container names its experts by local index
(``blocks.3.moe.deepspeed_moe.experts.deepspeed_experts.1.weight``). Files this project writes
(checkpoints, exports) use the single-device model's names with global expert ids
(``blocks.3.moe.experts.5.weight``), so they can be merged or resharded without knowing the
topology that wrote them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class ExpertPlacement:
    """Where this rank's experts sit: its expert-parallel rank and how many experts it holds."""

    ep_rank: int = 0
    num_local_experts: int = 1
    is_expert_writer: bool = True  # first rank of its expert-data-parallel group


_LOCAL = re.compile(r"\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")
_GLOBAL = re.compile(r"\.moe\.experts\.(\d+)\.")


def is_expert_name(name: str) -> bool:
    return bool(_LOCAL.search(name) or _GLOBAL.search(name))


def to_global(name: str, ep_rank: int, num_local_experts: int) -> str:
    match = _LOCAL.search(name)
    if not match:
        return name
    global_id = ep_rank * num_local_experts + int(match.group(1))
    return name[: match.start()] + f".experts.{global_id}." + name[match.end() :]


def to_local(name: str, ep_rank: int, num_local_experts: int) -> str | None:
    """Local name of a global expert name on this rank, or None if another rank owns it."""
    match = _GLOBAL.search(name)
    if not match:
        return name
    global_id = int(match.group(1))
    if global_id // num_local_experts != ep_rank:
        return None
    local_id = global_id % num_local_experts
    return (
        name[: match.start()]
        + f".moe.deepspeed_moe.experts.deepspeed_experts.{local_id}."
        + name[match.end() :]
    )
