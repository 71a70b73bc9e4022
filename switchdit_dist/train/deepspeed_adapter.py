"""Every private DeepSpeed attribute and function this project uses, in one place.

DeepSpeed has no public per-rank view of ZeRO 1/2's fp32 master partitions and optimizer state
(``deepspeed.utils.safe_get_local_*`` serve ZeRO 3 only, ``safe_get_full_*`` all-reduce whole
parameters), and its expert-parallel groups are created and looked up through private functions
of ``deepspeed.utils.groups``. These are the names a DeepSpeed upgrade may move; each function
says what it reads and why, and ``tests/test_deepspeed_adapter.py`` calls every one of them on a
real engine, so an upgrade that breaks one fails there, by name.

Checked against deepspeed 0.19.8 (``pyproject.toml`` bounds the release series).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# --- communication layer ------------------------------------------------------------------------


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU communication layer from JIT-compiling its shared-memory all-reduce
    op (``deepspeed_shm_comm``: tens of seconds in every fresh environment, and a C++ compiler on
    the machine) when it starts. Only ``inference_all_reduce`` uses that op, and training never
    calls it; ``deepspeed.comm.torch.build_shm_op`` skips ops that ``deepspeed.ops.__compatible_ops__``
    marks incompatible. Call before ``deepspeed.init_distributed`` / ``deepspeed.initialize``."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# --- optimizer wrappers -------------------------------------------------------------------------


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that steps: ZeRO 1/2 and the bf16/fp16 wrappers keep it as
    ``.optimizer`` (undocumented); at ZeRO 0 in fp32 ``engine.optimizer`` is it."""
    inner = getattr(engine.optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else engine.optimizer


def fp32_master_copies(engine) -> dict[int, torch.Tensor]:
    """``id(param) -> its fp32 master`` under ZeRO 0 with DeepSpeed's unfused fp16/bf16 optimizer,
    which pairs ``fp16_groups[i][j]`` (the module's weights) with ``fp32_groups[i][j]``; empty
    otherwise. Checkpoints store the masters, not the rounded module weights."""
    low, high = (getattr(engine.optimizer, k, None) or [] for k in ("fp16_groups", "fp32_groups"))
    return {id(p): m for lg, hg in zip(low, high) for p, m in zip(lg, hg)}


# --- ZeRO 1/2 fragments (``param._hp_mapping``) -------------------------------------------------


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """Whether ZeRO 1/2 (or the bf16 optimizer) partitions ``param``'s fp32 master and optimizer
    state: ``link_hp_params`` sets ``_hp_mapping`` (None on a rank that holds none of it)."""
    return hasattr(param, "_hp_mapping")


@dataclass(frozen=True)
class Fragment:
    """This rank's part of a partitioned parameter: elements ``[start, start + numel)`` of the
    flattened parameter; ``master`` is their fp32 master (a view into the flat partition)."""

    start: int
    numel: int
    master: torch.Tensor
    group_index: int  # the optimizer param group whose flat partition holds it


def fragment(param: torch.nn.Parameter) -> Fragment | None:
    """``param._hp_mapping``'s address (``lp_fragment_address``), master view
    (``get_hp_fragment()``) and group (``param_group_index``); None if this rank holds none."""
    mapping = param._hp_mapping
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    return Fragment(
        start=int(address.start),
        numel=int(address.numel),
        master=mapping.get_hp_fragment(),
        group_index=int(mapping.param_group_index),
    )


def flat_partition(engine, param: torch.nn.Parameter) -> torch.Tensor:
    """The flat fp32 partition the torch optimizer steps for ``param``'s group: DeepSpeed puts it
    as the only tensor of ``param_groups[param_group_index]["params"]``."""
    index = param._hp_mapping.param_group_index
    return torch_optimizer(engine).param_groups[index]["params"][0]


def optimizer_state_fragment(param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """``param``'s fragment of optimizer state ``key`` (``exp_avg``...): a view into the flat
    partition's state, made by ``link_optimizer_state``."""
    return param._hp_mapping.get_optim_state_fragment(key)


def link_optimizer_state(param: torch.nn.Parameter, flat: torch.Tensor, state: dict) -> None:
    """Point ``param``'s fragment views at ``state`` (the flat partition's optimizer state).
    DeepSpeed links them only after its first optimizer step; a freshly built engine that is
    loaded from a checkpoint (or whose first step was skipped) has none yet."""
    param._hp_mapping.set_optim_state_fragment(flat, state)


def data_parallel_group(param: torch.nn.Parameter):
    """The ranks that hold the other fragments of ``param`` (``_dp_group``, set with
    ``_hp_mapping``): the data-parallel group, the expert-data-parallel one for experts."""
    return param._dp_group


# --- engine counters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineCounters:
    global_steps: int
    global_samples: int
    skipped_steps: int


def engine_counters(engine) -> EngineCounters:
    """The engine's step and sample counters (undocumented attributes its own checkpoints save;
    the learning-rate schedule and logging read them)."""
    return EngineCounters(int(engine.global_steps), int(engine.global_samples), int(engine.skipped_steps))


def set_engine_counters(engine, counters: EngineCounters) -> None:
    engine.global_steps = counters.global_steps
    engine.global_samples = counters.global_samples
    engine.skipped_steps = counters.skipped_steps


# --- expert-parallel groups (``deepspeed.utils.groups``) ----------------------------------------


def has_expert_groups(group_name: str) -> bool:
    """Whether the expert/expert-data-parallel groups named ``ep_size_{n}`` exist
    (``groups._get_expert_parallel_group_dict``)."""
    from deepspeed.utils import groups

    return group_name in groups._get_expert_parallel_group_dict()


def create_expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False) -> None:
    """Create the expert and expert-data-parallel groups of ``ep_size`` as the engine would
    (``groups._create_expert_and_data_parallel``): layers built outside an engine need them."""
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(
        ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel
    )


def expert_parallel_group(group_name: str):
    """The expert-parallel process group of this rank (``groups._get_expert_parallel_group``)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(group_name)


def expert_parallel_rank(group_name: str) -> int:
    """This rank's index in its expert-parallel group: which experts it holds
    (``groups._get_expert_parallel_rank``)."""
    from deepspeed.utils import groups

    return int(groups._get_expert_parallel_rank(group_name))


def expert_data_parallel_rank(group_name: str) -> int:
    """This rank's index among the replicas of its experts (``groups._get_expert_data_parallel_rank``)."""
    from deepspeed.utils import groups

    return int(groups._get_expert_data_parallel_rank(group_name))
