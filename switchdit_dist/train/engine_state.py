"""A DeepSpeed engine's training state as checkpoint entries (``checkpoint/schema.py``), and back.

Saving, every rank gives what it holds, without any communication:

- under ZeRO 1/2 (any precision) and the bf16 optimizer, a parameter's fp32 master and Adam
  moments are partitioned: the rank gives its flat range of each (``Range``), the ranks of the
  parameter's data-parallel group together cover it once;
- otherwise (ZeRO 0) every rank holds whole tensors (the fp32 master copy of DeepSpeed's unfused
  bf16 optimizer, or the fp32 weights themselves): it gives them whole, and DCP writes each once;
- the EMA (``EMA.state_dict``: full fp32 tensors of the parameters this rank holds), the trainer
  state (rank 0) and this rank's side state.

Loading, every rank asks for what the new layout gives it: the whole fp32 weight of each of its
parameters (the module's copy), its range (or all) of each Adam moment, every step count, its EMA
and side state. The entries are CPU tensors filled by DCP, then copied into the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchdit_dist.checkpoint import schema
from switchdit_dist.checkpoint.dcp_io import EntrySpec, Range
from switchdit_dist.errors import UserError
from switchdit_dist.train import deepspeed_adapter as ds
from switchdit_dist.train import param_names
from switchdit_dist.train.param_names import ExpertPlacement


def global_parameters(
    module: torch.nn.Module, placement: ExpertPlacement
) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(local name, global name, parameter) of every parameter of this rank, in module order."""
    return [
        (name, param_names.to_global(name, placement.ep_rank, placement.num_local_experts), p)
        for name, p in module.named_parameters()
    ]


# --- the optimizer state under each ZeRO stage and precision ------------------------------------


class OptimizerView:
    """This rank's fp32 masters and Adam state, per parameter, however DeepSpeed keeps them:
    partitioned (ZeRO 1/2, the bf16 optimizer), as master copies (ZeRO 0 with the unfused bf16
    optimizer) or in the parameters themselves (ZeRO 0 in fp32)."""

    def __init__(self, engine):
        self.engine = engine
        self.base = ds.torch_optimizer(engine)
        self.masters = ds.fp32_master_copies(engine)
        self.stepped = {id(t) for group in self.base.param_groups for t in group["params"]}
        self._link()

    def _holder(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor the torch optimizer steps for ``param``: its flat partition, master or itself."""
        holder = (
            ds.flat_partition(self.engine, param)
            if ds.is_partitioned(param)
            else self.masters.get(id(param), param)
        )
        if id(holder) not in self.stepped:
            raise RuntimeError(
                "cannot find the optimizer state of a parameter under "
                f"{type(self.engine.optimizer).__name__}; checkpoints support ZeRO 1/2, and ZeRO 0 "
                "with fp32 or DeepSpeed's unfused fp16/bf16 optimizer"
            )
        return holder

    def state(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """The Adam state of ``param``'s holder, created (zeros, step 0) if the optimizer has not
        stepped yet, as torch's AdamW would on its first step."""
        holder = self._holder(param)
        state = self.base.state[holder]
        if not state:
            state.update(_new_adam_state(holder))
        return state

    def _link(self) -> None:
        for p in self.engine.module.parameters():
            if p.requires_grad and ds.is_partitioned(p) and ds.fragment(p) is not None:
                ds.link_optimizer_state(p, self._holder(p), self.state(p))

    def master(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The whole fp32 master of an unpartitioned parameter."""
        return self.masters.get(id(param), param).detach()

    def set_steps(self, steps: dict[int, float]) -> None:
        """Step counts by ``id(param)``. Under ZeRO one flat partition steps for all its parameters:
        every partition takes the largest count (counts differ only when a ZeRO 0 run left a
        parameter without gradients for some steps)."""
        params = [p for p in self.engine.module.parameters() if id(p) in steps]
        partitioned = [steps[id(p)] for p in params if ds.is_partitioned(p)]
        for p in params:
            if not ds.is_partitioned(p):
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


# --- saving -------------------------------------------------------------------------------------


@dataclass
class Entries:
    state: dict[str, torch.Tensor]
    ranges: dict[str, Range]


def engine_entries(engine, placement: ExpertPlacement) -> Entries:
    """This rank's fp32 masters and Adam state, as live views (nothing is copied here: DCP copies
    when it writes, or stages a CPU copy first for an asynchronous save)."""
    view = OptimizerView(engine)
    state: dict[str, torch.Tensor] = {}
    ranges: dict[str, Range] = {}
    for _, name, p in global_parameters(engine.module, placement):
        trainable = p.requires_grad
        if trainable and ds.is_partitioned(p):
            part = ds.fragment(p)
            if part is None:
                continue  # other ranks of its group hold all of it
            where = Range(part.start, p.numel())
            state[schema.model_key(name)] = part.master.detach()
            ranges[schema.model_key(name)] = where
            for key in schema.ADAM_MOMENTS:
                state[schema.optim_key(name, key)] = ds.optimizer_state_fragment(p, key).detach()
                ranges[schema.optim_key(name, key)] = where
            state[schema.optim_key(name, "step")] = _step_tensor(view.state(p)["step"])
            continue
        state[schema.model_key(name)] = _flat_fp32(view.master(p) if trainable else p.detach())
        if trainable:
            adam = view.state(p)
            for key in schema.ADAM_MOMENTS:
                state[schema.optim_key(name, key)] = adam[key].detach().reshape(-1)
            state[schema.optim_key(name, "step")] = _step_tensor(adam["step"])
    return Entries(state, ranges)


def ema_entries(ema_state: dict[str, torch.Tensor], placement: ExpertPlacement) -> dict[str, torch.Tensor]:
    return {
        schema.ema_key(param_names.to_global(n, placement.ep_rank, placement.num_local_experts)): t.detach()
        for n, t in ema_state.items()
    }


def _flat_fp32(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return (tensor if tensor.dtype == torch.float32 else tensor.float()).reshape(-1)


def _step_tensor(step) -> torch.Tensor:
    if torch.is_tensor(step):
        return step.detach().float().reshape(())
    return torch.tensor(float(step), dtype=torch.float32)


def trainer_state(engine, step: int, skipped_total: int) -> schema.TrainerState:
    counters = ds.engine_counters(engine)
    scheduler = getattr(engine, "lr_scheduler", None)
    return schema.TrainerState(
        step=step,
        global_steps=counters.global_steps,
        global_samples=counters.global_samples,
        skipped_steps=counters.skipped_steps,
        skipped_total=skipped_total,
        lr_scheduler=scheduler.state_dict() if scheduler is not None else None,
    )


# --- loading ------------------------------------------------------------------------------------


@dataclass
class Targets:
    """Empty CPU tensors for every entry this rank reads, filled in place by ``dcp_io.load``."""

    state: dict[str, torch.Tensor]
    ranges: dict[str, Range]


def load_targets(
    engine, placement: ExpertPlacement, index: dict[str, EntrySpec], side_rank: int, where: str
) -> Targets:
    """What this rank reads, checked against the checkpoint's ``index`` (missing entries, shapes)."""
    state: dict[str, torch.Tensor] = {}
    ranges: dict[str, Range] = {}
    for _, name, p in global_parameters(engine.module, placement):
        state[schema.model_key(name)] = torch.empty(p.numel(), dtype=torch.float32)
        state[schema.ema_key(name)] = torch.empty(p.shape, dtype=torch.float32)
        if not p.requires_grad:
            continue
        part = ds.fragment(p) if ds.is_partitioned(p) else None
        if not ds.is_partitioned(p) or part is not None:
            numel = part.numel if part is not None else p.numel()
            for key in schema.ADAM_MOMENTS:
                state[schema.optim_key(name, key)] = torch.empty(numel, dtype=torch.float32)
                if part is not None:
                    ranges[schema.optim_key(name, key)] = Range(part.start, p.numel())
        state[schema.optim_key(name, "step")] = torch.empty((), dtype=torch.float32)
    for key in (schema.TRAINER_STATE_KEY, schema.rank_key(side_rank)):
        if key in index:
            state[key] = torch.empty(index[key].shape, dtype=torch.uint8)
    _check_against(state, ranges, index, where, side_rank)
    return Targets(state, ranges)


def _check_against(
    state: dict[str, torch.Tensor],
    ranges: dict[str, Range],
    index: dict[str, EntrySpec],
    where: str,
    side_rank: int,
) -> None:
    wanted = [*state, schema.TRAINER_STATE_KEY, schema.rank_key(side_rank)]
    missing = sorted({k for k in wanted if k not in index})
    wrong = []
    for key, tensor in state.items():
        if key not in index:
            continue
        saved = index[key].shape
        expected = (ranges[key].total,) if key in ranges else tuple(tensor.shape)
        if not key.startswith("trainer/") and tuple(saved) != expected:
            wrong.append(f"{key} {tuple(saved)} (this model: {expected})")
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} entr(y/ies), e.g. {missing[:3]}")
        if wrong:
            problems.append(f"wrong shape: {', '.join(wrong[:3])}")
        raise UserError(f"{where} does not match this model ({'; '.join(problems)})")


@torch.no_grad()
def install(
    engine, placement: ExpertPlacement, values: dict[str, torch.Tensor], where: str
) -> schema.TrainerState:
    """Copy loaded entries into the engine: module weights, fp32 masters, Adam moments and steps,
    counters and learning-rate schedule. Returns the trainer state."""
    view = OptimizerView(engine)
    steps: dict[int, float] = {}
    for _, name, p in global_parameters(engine.module, placement):
        weight = values[schema.model_key(name)]
        p.data.copy_(weight.view(p.shape).to(device=p.device, dtype=p.dtype))
        if not p.requires_grad:
            continue
        if ds.is_partitioned(p):
            part = ds.fragment(p)
            if part is not None:
                part.master.copy_(weight.narrow(0, part.start, part.numel).to(part.master.device))
                for key in schema.ADAM_MOMENTS:
                    target = ds.optimizer_state_fragment(p, key)
                    target.copy_(values[schema.optim_key(name, key)].to(target.device))
        else:
            if id(p) in view.masters:
                master = view.masters[id(p)]
                master.copy_(weight.view(master.shape).to(master.device))
            adam = view.state(p)
            for key in schema.ADAM_MOMENTS:
                adam[key].copy_(
                    values[schema.optim_key(name, key)].view(adam[key].shape).to(adam[key].device)
                )
        steps[id(p)] = float(values[schema.optim_key(name, "step")])
    view.set_steps(steps)
    state = schema.TrainerState.decode(values[schema.TRAINER_STATE_KEY], where)
    _restore_counters(engine, state, where)
    return state


def _restore_counters(engine, state: schema.TrainerState, where: str) -> None:
    ds.set_engine_counters(
        engine, ds.EngineCounters(state.global_steps, state.global_samples, state.skipped_steps)
    )
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is None or state.lr_scheduler is None:
        return
    scheduler.load_state_dict(state.lr_scheduler)
    groups = scheduler.optimizer.param_groups
    last = scheduler.get_last_lr()
    if len(last) != len(groups):
        raise UserError(
            f"{where}: the learning-rate schedule was saved for {len(last)} optimizer group(s), "
            f"this run has {len(groups)}"
        )
    for group, lr in zip(groups, last):
        group["lr"] = lr


def ema_state(
    values: dict[str, torch.Tensor], module: torch.nn.Module, placement: ExpertPlacement
) -> dict[str, torch.Tensor]:
    """This rank's EMA by local name, from loaded entries."""
    return {local: values[schema.ema_key(name)] for local, name, _ in global_parameters(module, placement)}
