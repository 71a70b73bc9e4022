"""DeepSpeed engine set-up: the model with expert-parallel experts, torch AdamW with MoE parameter
groups, ZeRO stage and precision from the config, warm-up schedule."""

from __future__ import annotations

import torch

from switchdit_dist.config import Config, grad_accumulation
from switchdit_dist.models.dit import DiTConfig
from switchdit_dist.models.registry import build_model
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
        "gradient_accumulation_steps": grad_accumulation(config, world_size),
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

    if config.model.is_moe:
        from switchdit_dist.moe.layer import expert_parallel_factory

        model = build_model(model_config, expert_parallel_factory(config.parallel.ep_size))
    else:
        model = build_model(model_config)
    model.to(env.device)
    precision = resolve_precision(config, env.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": trainable, "name": "params"}]
    if config.model.is_moe:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    o = config.optim
    optimizer = make_guarded(torch.optim.AdamW)(
        groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
    )
    warmup = max(o.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, env.world_size, precision),
    )
    return engine, precision, optimizer


def expert_placement(module: torch.nn.Module) -> ExpertPlacement:
    """This rank's expert-parallel rank and local expert count, from DeepSpeed's groups."""
    from deepspeed.utils import groups

    for sub in module.modules():
        name = getattr(sub, "expert_group_name", None)
        if name is not None and hasattr(sub, "num_local_experts"):
            return ExpertPlacement(
                ep_rank=groups._get_expert_parallel_rank(name),
                num_local_experts=sub.num_local_experts,
                is_expert_writer=groups._get_expert_data_parallel_rank(name) == 0,
            )
    return ExpertPlacement()
