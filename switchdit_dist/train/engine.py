"""DeepSpeed engine set-up: the model with expert-parallel experts, torch AdamW with MoE parameter
groups (fused on CUDA), ZeRO stage and precision from the config, warm-up schedule, optionally
compiled blocks; and what the trainer reads from the engine (expert placement, where the fp32 master
weights are), through ``deepspeed_adapter`` (every private DeepSpeed name in one place).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from switchdit_dist.config import Config
from switchdit_dist.models.dit import DiTConfig
from switchdit_dist.models.registry import build_model
from switchdit_dist.parallel_dims import ParallelDims
from switchdit_dist.train import deepspeed_adapter
from switchdit_dist.train.checkpoint import ExpertPlacement
from switchdit_dist.train.distributed import DistEnv
from switchdit_dist.train.finite_guard import make_guarded


def resolve_precision(config: Config, device: torch.device) -> str:
    if config.parallel.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return config.parallel.precision


def deepspeed_config(config: Config, world_size: int, precision: str) -> dict:
    t = config.train
    ds = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": ParallelDims.from_config(config, world_size).accumulation,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if config.optim.grad_clip > 0:
        ds["gradient_clipping"] = config.optim.grad_clip
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def build_engine(config: Config, model_config: DiTConfig, env: DistEnv):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    precision = resolve_precision(config, env.device)
    if config.model.is_moe:
        from switchdit_dist.expert_comm import resolve_expert_comm
        from switchdit_dist.moe.layer import expert_parallel_factory

        value_bytes = 2 if precision == "bf16" else 4
        comm = resolve_expert_comm(
            config.parallel.expert_comm,
            model_config,
            config.train.micro_batch,
            config.parallel.ep_size,
            value_bytes,
        )
        model = build_model(model_config, expert_parallel_factory(config.parallel.ep_size, comm))
    else:
        model = build_model(model_config)
    model.to(env.device)
    if config.train.compile:
        compile_blocks(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": trainable, "name": "params"}]
    if config.model.is_moe:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    o = config.optim
    optimizer = make_guarded(AdamW)(
        groups,
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
        **adamw_kernel(env.device),
    )
    warmup = max(o.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    deepspeed_adapter.skip_shared_memory_op()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, env.world_size, precision),
    )
    return engine, precision, optimizer


def expert_placement(module: torch.nn.Module) -> ExpertPlacement:
    """This rank's expert-parallel rank and local expert count, from DeepSpeed's groups."""
    from switchdit_dist.train import deepspeed_adapter as ds

    for sub in module.modules():
        name = getattr(sub, "expert_group_name", None)
        if name is not None and hasattr(sub, "num_local_experts"):
            return ExpertPlacement(
                ep_rank=ds.expert_parallel_rank(name),
                num_local_experts=sub.num_local_experts,
                is_expert_writer=ds.expert_data_parallel_rank(name) == 0,
            )
    return ExpertPlacement()


class AdamW(torch.optim.AdamW):
    """torch's AdamW; with ``fused=True`` every state's ``step`` is first put on its parameter's
    device, as the fused kernel reads it there. torch's own ``load_state_dict`` does that, but state
    written from outside (a checkpoint resume creates Adam state with a host ``step``, as the
    unfused kernels keep it) would reach the kernel on the host. A check per step; a copy only then."""

    def step(self, closure=None):
        if self.defaults.get("fused"):
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                        state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        return super().step(closure)


def adamw_kernel(device: torch.device) -> dict:
    """torch AdamW's fused kernel on CUDA (one launch per step for all tensors, torch >= 2.0); on the
    CPU the default (foreach) kernel, whose results the exact-resume tests were written with."""
    return {"fused": True} if device.type == "cuda" else {}


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` the dense part of every transformer block, in place (``train.compile``).

    What is compiled is each block's ``residual_branches`` (adaLN modulation, attention, MLP: nearly
    all of a block's FLOPs), whose shapes are [micro_batch, tokens, width] at every step, so
    ``dynamic=False`` gives static-shape kernels and a single graph, shared by all blocks. The
    router and the expert-parallel MoE layer stay eager: their per-expert sample counts change every
    step and size the all-to-all splits and expert runs, and no ``dynamic=`` setting keeps Dynamo
    from recompiling on them (it specialises sizes 0 and 1, and counts are host integers), so
    compiling the whole block recompiled on most steps until the recompile limit (8) sent those
    frames back to eager. Measured on the tiny Switch-DiT, 30 steps, fresh routes each step: whole
    blocks 8-11 recompiles (dynamic=None/True/False), dense part 1 graph and 0 recompiles.

    Parameter and module names are unchanged (no ``_orig_mod.`` wrapper), so checkpoints, the EMA and
    exports are the same with and without compilation. A new input shape (a validation micro-batch
    of another size) or grad mode costs one more graph.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no transformer blocks to compile")
    for block in blocks:
        block.residual_branches = torch.compile(block.residual_branches, dynamic=False, backend=backend)


# --- the fp32 master weights ---------------------------------------------------------------------


@dataclass(frozen=True)
class MasterSlice:
    """This rank's part of one parameter's fp32 master copy, as DeepSpeed's optimizer holds it:
    elements ``[start, start + numel)`` of the flattened parameter (``numel`` 0 when the rank holds
    none of it). ``read()`` returns the current values, flat, without copying. ``group`` is the
    process group whose ranks together hold the whole parameter (None: this rank holds all of it)."""

    start: int
    numel: int
    read: Callable[[], torch.Tensor]
    group: object = None

    @property
    def partitioned(self) -> bool:
        return self.group is not None


def fp32_masters(engine) -> dict[str, MasterSlice]:
    """Where the fp32 master of each parameter lives, by parameter name; empty when the module's
    weights are fp32 themselves (then they are the masters: DeepSpeed copies the fp32 result of
    every step into them unchanged). Parameters without a master (frozen ones) are left out.

    DeepSpeed keeps the masters inside its optimizer wrapper, reached through
    ``deepspeed_adapter``: under ZeRO 1/2 (and the bf16 optimizer) each rank holds a fragment of
    every parameter (``fragment``) and the parameter's data-parallel group holds the rest; under
    ZeRO 0 with bf16 the unfused optimizer keeps a full fp32 copy per parameter.
    """
    from switchdit_dist.train import deepspeed_adapter as ds

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for _, p in named):
        return {}
    masters: dict[str, MasterSlice] = {}
    if all(ds.is_partitioned(p) for _, p in named):
        for name, p in named:
            held = ds.fragment(p)
            group = ds.data_parallel_group(p)
            if held is None:
                masters[name] = MasterSlice(0, 0, _empty_on(p.device), group)
            else:
                masters[name] = MasterSlice(held.start, held.numel, _fragment_of(p), group)
        return masters
    copies = ds.fp32_master_copies(engine)
    if all(id(p) in copies for _, p in named):
        return {name: MasterSlice(0, p.numel(), _flat(copies[id(p)])) for name, p in named}
    low = next(p.dtype for _, p in named if p.dtype != torch.float32)
    raise RuntimeError(
        f"{type(engine.optimizer).__name__} trains {low} weights but their fp32 masters were not found "
        "(neither ZeRO 1/2 fragments nor the unfused optimizer's copies); the EMA would average rounded "
        "weights. Check the DeepSpeed version."
    )


def _fragment_of(param: torch.nn.Parameter) -> Callable[[], torch.Tensor]:
    from switchdit_dist.train import deepspeed_adapter as ds

    # looked up at every read, not kept: DeepSpeed may re-link the fragments (e.g. on load)
    return lambda: ds.fragment(param).master


def _flat(master: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: master.view(-1)


def _empty_on(device: torch.device) -> Callable[[], torch.Tensor]:
    return lambda: torch.empty(0, dtype=torch.float32, device=device)
