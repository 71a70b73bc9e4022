"""A topology-independent copy of the training state, for resuming on a different layout.

DeepSpeed cannot load a ZeRO 1/2 MoE checkpoint at another data-parallel or expert-parallel size
(its optimizer files hold flat partitions of the world that wrote them). So every checkpoint also
gets ``portable/``: the fp32 weights and the full Adam state of every parameter, keyed by the
single-device model's names (experts by their *global* ids)::

    model/blocks.3.moe.experts.5.weight           fp32 master weight
    optim/blocks.3.moe.experts.5.weight/exp_avg   Adam first moment
    optim/blocks.3.moe.experts.5.weight/exp_avg_sq
    optim/blocks.3.moe.experts.5.weight/step      Adam step count (0-dim)

written with ``torch.distributed.checkpoint`` (DCP), plus ``trainer_state.json`` (engine counters,
learning-rate schedule). DCP is part of torch, writes from every rank in parallel, needs no CUDA,
and its loader reads exactly the keys a rank asks for whatever topology wrote them, so a resumed
rank asks for its own experts and the replicated weights only.

Full tensors come from DeepSpeed's ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
(an all-reduce over the parameter's data-parallel group: the expert-data-parallel group for
experts) under ZeRO 1/2 and the bf16 optimizer, and straight from the torch optimizer under ZeRO 0.
Each full tensor is kept by one rank of its group only (round robin), so no rank holds more than its
share of the copy and DCP writes every tensor once.

The EMA needs no copy here: its checkpoint files are already keyed by global names
(``load_global_ema`` reads them for any layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from switchdit_dist.errors import UserError
from switchdit_dist.train import comm, param_names
from switchdit_dist.train.checkpoint import ExpertPlacement, atomic_write_text

PORTABLE_DIR = "portable"
TRAINER_STATE_FILE = "trainer_state.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def model_key(name: str) -> str:
    return f"model/{name}"


def optim_key(name: str, key: str) -> str:
    return f"optim/{name}/{key}"


def has_portable(checkpoint_dir: Path) -> bool:
    directory = Path(checkpoint_dir) / PORTABLE_DIR
    return (directory / ".metadata").is_file() and (directory / TRAINER_STATE_FILE).is_file()


def global_parameters(
    module: torch.nn.Module, placement: ExpertPlacement
) -> list[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) for every parameter of this rank, in module order."""
    return [
        (param_names.to_global(name, placement.ep_rank, placement.num_local_experts), p)
        for name, p in module.named_parameters()
    ]


# --- the Adam state under each ZeRO stage and precision -----------------------------------------


class AdamView:
    """Full-tensor access to the fp32 weights and Adam state of an engine's parameters.

    DeepSpeed keeps them in one of three ways:

    - partitioned (ZeRO 1/2 in any precision, the bf16 optimizer): each rank holds fragments of flat
      fp32 partitions; parameters carry ``_hp_mapping``, and ``safe_get/set_full_*`` assemble or
      scatter full tensors (the getters all-reduce over the parameter's data-parallel group);
    - master copies (ZeRO 0 with the unfused fp16/bf16 optimizer): one fp32 master per parameter,
      stepped by the torch optimizer;
    - plain (ZeRO 0 in fp32): the torch optimizer steps the parameters themselves.
    """

    def __init__(self, engine):
        self.engine = engine
        inner = getattr(engine.optimizer, "optimizer", None)
        self.base: torch.optim.Optimizer = (
            inner if isinstance(inner, torch.optim.Optimizer) else engine.optimizer
        )
        low, high = (getattr(engine.optimizer, k, None) or [] for k in ("fp16_groups", "fp32_groups"))
        self.masters = {id(p): m for lg, hg in zip(low, high) for p, m in zip(lg, hg)}
        self.stepped = {id(t) for group in self.base.param_groups for t in group["params"]}
        self._link()

    @staticmethod
    def partitioned(param: torch.nn.Parameter) -> bool:
        return hasattr(param, "_hp_mapping")

    def _holder(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor the torch optimizer steps for ``param``: its flat partition, master or itself."""
        if self.partitioned(param):
            holder = self.base.param_groups[param._hp_mapping.param_group_index]["params"][0]
        else:
            holder = self.masters.get(id(param), param)
        if id(holder) not in self.stepped:
            raise RuntimeError(
                "cannot find the optimizer state of a parameter under "
                f"{type(self.engine.optimizer).__name__}; the portable copy supports ZeRO 1/2, and "
                "ZeRO 0 with fp32 or DeepSpeed's unfused fp16/bf16 optimizer"
            )
        return holder

    def state(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """``param``'s Adam state, created (zero, step 0) if the optimizer has not stepped yet, as
        torch's AdamW would on its first step."""
        holder = self._holder(param)
        state = self.base.state[holder]
        if not state:
            state.update(_new_adam_state(holder))
        return state

    def _link(self) -> None:
        """Point every partitioned parameter's fragment views at its current Adam state.

        DeepSpeed links them once, after the first optimizer step; a fresh engine (resume) has none
        yet, and a first step skipped for non-finite gradients would leave them empty.
        """
        for p in self.engine.module.parameters():
            if p.requires_grad and self.partitioned(p) and p._hp_mapping is not None:
                p._hp_mapping.set_optim_state_fragment(self._holder(p), self.state(p))

    # --- reading (collective under ZeRO 1/2) ---

    def full_weight(self, param: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        if self.partitioned(param):
            return safe_get_full_fp32_param(param)
        return self.masters.get(id(param), param).detach().float()

    def full_moment(self, param: torch.nn.Parameter, key: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_optimizer_state

        if self.partitioned(param):
            return safe_get_full_optimizer_state(param, key)
        return self.state(param)[key].detach()

    def step_count(self, param: torch.nn.Parameter) -> torch.Tensor:
        """Adam's step count (0-dim). Under ZeRO a rank whose partition misses the parameter does not
        know its group, so the count is the maximum over the parameter's group (collective)."""
        if not self.partitioned(param):
            return self.state(param)["step"].detach().float().cpu().reshape(())
        count = torch.zeros(1, dtype=torch.float32, device=param.device)
        if param._hp_mapping is not None:
            count.copy_(self.state(param)["step"].detach().float().reshape(1))
        comm.all_reduce_max([count], group=param._dp_group)
        return count.cpu().reshape(())

    # --- writing (local: each rank sets its own fragments) ---

    @torch.no_grad()
    def set_weight(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        param.data.copy_(value.to(device=param.device, dtype=param.dtype))
        if self.partitioned(param):
            safe_set_full_fp32_param(param, value.to(param.device))
        elif id(param) in self.masters:
            master = self.masters[id(param)]
            master.data.copy_(value.to(device=master.device, dtype=master.dtype))

    @torch.no_grad()
    def set_moment(self, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if self.partitioned(param):
            safe_set_full_optimizer_state(param, value.to(param.device), key)
        else:
            target = self.state(param)[key]
            target.copy_(value.to(device=target.device, dtype=target.dtype))

    @torch.no_grad()
    def set_steps(self, steps: dict[int, float]) -> None:
        """Step counts by ``id(param)``. Under ZeRO one flat partition steps for all its parameters:
        every partition takes the largest count (counts differ only when a ZeRO 0 run left a
        parameter without a gradient for some steps)."""
        params = [p for p in self.engine.module.parameters() if id(p) in steps]
        partitioned = [steps[id(p)] for p in params if self.partitioned(p)]
        for p in params:
            if not self.partitioned(p):
                self.state(p)["step"].fill_(steps[id(p)])
        if partitioned:
            for group in self.base.param_groups:
                for flat in group["params"]:
                    state = self.base.state[flat]
                    if not state:
                        state.update(_new_adam_state(flat))
                    state["step"].fill_(max(partitioned))


def _new_adam_state(like: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "step": torch.tensor(0.0, dtype=torch.float32),
        "exp_avg": torch.zeros_like(like, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(like, memory_format=torch.preserve_format),
    }


# --- gathering full tensors ---------------------------------------------------------------------


def _keeper(param: torch.nn.Parameter, index: int) -> bool:
    """Whether this rank keeps the full tensors of parameter number ``index``: round robin over the
    ranks of its data-parallel group (all of them hold the full tensor after the all-reduce)."""
    if not (AdamView.partitioned(param) and dist.is_initialized()):
        return True  # not partitioned: every rank has it; DCP writes replicated keys once
    group = param._dp_group
    return index % dist.get_world_size(group) == dist.get_rank(group)


def gather_full_state(
    engine, placement: ExpertPlacement, owned_only: bool = False
) -> dict[str, torch.Tensor]:
    """Full fp32 weights and Adam state of every parameter, by global name, as CPU tensors.

    Collective: every rank must call it. ``owned_only`` keeps on each rank only the tensors it is
    the keeper of (what ``save_portable`` writes); otherwise every rank returns all of its
    parameters (replicated ones and its own experts).
    """
    view = AdamView(engine)
    out: dict[str, torch.Tensor] = {}
    for index, (name, p) in enumerate(global_parameters(engine.module, placement)):
        keep = not owned_only or _keeper(p, index)
        weight = view.full_weight(p)
        if keep:
            out[model_key(name)] = weight.detach().cpu().clone()
        if not p.requires_grad:
            continue
        for key in ADAM_KEYS:
            moment = view.full_moment(p, key)
            if keep:
                out[optim_key(name, key)] = moment.detach().float().cpu().clone()
        step = view.step_count(p)
        if keep:
            out[optim_key(name, "step")] = step
    return out


# --- writing ------------------------------------------------------------------------------------


def trainer_counters(engine) -> dict[str, Any]:
    scheduler = getattr(engine, "lr_scheduler", None)
    return {
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
    }


def save_portable(engine, checkpoint_dir: Path, placement: ExpertPlacement, step: int) -> None:
    """Write ``checkpoint_dir/portable/`` (collective). Write failures raise OSError on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(checkpoint_dir) / PORTABLE_DIR
    state = gather_full_state(engine, placement, owned_only=True)
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)))
    except CheckpointException as err:  # raised on every rank when any rank failed to write
        raise OSError(f"writing the portable copy {directory} failed: {err}") from None
    if not dist.is_initialized() or dist.get_rank() == 0:
        counters = {"step": step, **trainer_counters(engine)}
        atomic_write_text(directory / TRAINER_STATE_FILE, json.dumps(counters, indent=2, sort_keys=True))


# --- reading ------------------------------------------------------------------------------------


def _metadata(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(directory)).read_metadata()
    except Exception as err:  # missing or corrupt .metadata
        raise UserError(f"{directory}: not a readable portable checkpoint copy ({err})") from None


def read_portable(checkpoint_dir: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a portable copy (all, or ``keys``) in this process, as CPU tensors.

    For tools and tests that run in one process, whatever topology wrote the copy.
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(checkpoint_dir) / PORTABLE_DIR
    tensors = _metadata(directory).state_dict_metadata
    wanted = list(tensors) if keys is None else keys
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise UserError(f"{directory}: portable copy lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    out = {k: torch.empty(tuple(tensors[k].size), dtype=tensors[k].properties.dtype) for k in wanted}
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    return out


def _wanted_tensors(engine, placement: ExpertPlacement, directory: Path) -> dict[str, torch.Tensor]:
    """Empty CPU tensors for every key this rank needs, checked against the copy's metadata."""
    tensors = _metadata(directory).state_dict_metadata
    wanted: dict[str, torch.Tensor] = {}
    for name, p in global_parameters(engine.module, placement):
        wanted[model_key(name)] = torch.empty(p.shape, dtype=torch.float32)
        if p.requires_grad:
            for key in ADAM_KEYS:
                wanted[optim_key(name, key)] = torch.empty(p.shape, dtype=torch.float32)
            wanted[optim_key(name, "step")] = torch.empty((), dtype=torch.float32)
    missing = [k for k in wanted if k not in tensors]
    wrong = [
        f"{k} {tuple(tensors[k].size)} (this model: {tuple(v.shape)})"
        for k, v in wanted.items()
        if k in tensors and tuple(tensors[k].size) != tuple(v.shape)
    ]
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if wrong:
            problems.append(f"wrong shape: {', '.join(wrong[:3])}")
        raise UserError(f"{directory}: portable copy does not match this model ({'; '.join(problems)})")
    return wanted


def _install(engine, placement: ExpertPlacement, values: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the engine: model weights, fp32 masters, Adam moments and steps."""
    view = AdamView(engine)
    steps: dict[int, float] = {}
    for name, p in global_parameters(engine.module, placement):
        view.set_weight(p, values[model_key(name)])
        if p.requires_grad:
            for key in ADAM_KEYS:
                view.set_moment(p, key, values[optim_key(name, key)])
            steps[id(p)] = float(values[optim_key(name, "step")])
    view.set_steps(steps)


def _restore_counters(engine, counters: dict[str, Any], source: Path) -> None:
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])
    scheduler = getattr(engine, "lr_scheduler", None)
    saved = counters.get("lr_scheduler")
    if scheduler is None or saved is None:
        return
    scheduler.load_state_dict(saved)
    groups = scheduler.optimizer.param_groups
    last = scheduler.get_last_lr()
    if len(last) != len(groups):
        raise UserError(
            f"{source}: the learning-rate schedule was saved for {len(last)} optimizer group(s), "
            f"this run has {len(groups)}"
        )
    for group, lr in zip(groups, last):
        group["lr"] = lr


def load_portable(engine, checkpoint_dir: Path, placement: ExpertPlacement) -> dict[str, Any]:
    """Load ``checkpoint_dir/portable/`` into a freshly built engine of any layout (collective).

    Returns the saved trainer state (step and engine counters).
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(checkpoint_dir) / PORTABLE_DIR
    if not has_portable(checkpoint_dir):
        raise UserError(
            f"checkpoint {checkpoint_dir} has no complete portable copy ({directory}); it cannot be resumed "
            "on a different number of processes or expert-parallel size"
        )
    counters = json.loads((directory / TRAINER_STATE_FILE).read_text())
    values = _wanted_tensors(engine, placement, directory)
    dcp.load(values, storage_reader=dcp.FileSystemReader(str(directory)))
    _install(engine, placement, values)
    _restore_counters(engine, counters, directory)
    return counters


def load_global_ema(
    checkpoint_dir: Path, placement: ExpertPlacement, local_names: list[str]
) -> dict[str, torch.Tensor]:
    """This rank's EMA (local names) from the EMA files of a checkpoint written by any layout."""
    checkpoint_dir = Path(checkpoint_dir)
    files = [
        checkpoint_dir / "ema_shared.safetensors",
        *sorted(checkpoint_dir.glob("ema_experts_ep*.safetensors")),
    ]
    wanted = {
        param_names.to_global(name, placement.ep_rank, placement.num_local_experts): name
        for name in local_names
    }
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"checkpoint {checkpoint_dir} lacks {file.name}")
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    state[wanted[key]] = f.get_tensor(key)
    missing = sorted(set(local_names) - set(state))
    if missing:
        raise UserError(
            f"checkpoint {checkpoint_dir}: EMA files lack {len(missing)} weight(s), e.g. {missing[:3]}"
        )
    return state


# --- resuming on another layout -----------------------------------------------------------------


@dataclass
class ReshardedResume:
    step: int
    side: dict[str, Any]  # side state to continue from (data position, RNG, counters)
    ema: dict[str, torch.Tensor]  # this rank's EMA, local names


def resume_resharded(
    engine,
    checkpoint_dir: Path,
    placement: ExpertPlacement,
    local_names: list[str],
    rank: int,
    same_ranks: bool,
) -> ReshardedResume:
    """Everything a trainer of another layout needs from ``checkpoint_dir`` (collective).

    Model, fp32 masters, Adam state and counters go into ``engine``; the EMA comes back by local
    name. The side state is this rank's own when the number of ranks is unchanged (only the
    expert-parallel size differs), else rank 0's: its data position then belongs to another layout,
    which the loader answers by starting the next epoch (``LatentLoader.load_state_dict``).
    """
    counters = load_portable(engine, checkpoint_dir, placement)
    side_file = Path(checkpoint_dir) / f"side_rank_{rank if same_ranks else 0}.pt"
    if not side_file.is_file():
        raise UserError(f"checkpoint {checkpoint_dir} lacks {side_file.name}")
    side = torch.load(side_file, map_location="cpu", weights_only=True)
    if int(side["step"]) != int(counters["step"]):
        raise UserError(
            f"checkpoint {checkpoint_dir}: {side_file.name} is from step {side['step']} but the portable "
            f"copy from step {counters['step']}"
        )
    return ReshardedResume(
        step=int(counters["step"]), side=side, ema=load_global_ema(checkpoint_dir, placement, local_names)
    )
