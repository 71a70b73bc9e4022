"""``switchdit bench placement``: all-to-all bytes of token dispatch per training step under
``parallel.placement`` random and route_aware, side by side, for a router read from a model file
(a trained one: ``--model runs/demo/model-ema.safetensors``) and an untrained Switch-DiT with more
experts (``--num-experts``, ``--expert-kind``). Plain arithmetic on the routes: no process group.

Per step every (sample, block, slot) pair whose expert lives on another EP rank sends one [L, D]
block in dispatch and one back in combine, forward and backward (4 transfers). Beside the two
placements, the floor: what the same timesteps would send with every sample on its own cheapest EP
rank, the ranks' equal sample counts dropped. No deal of them can send less."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from switchdit_dist.errors import UserError
from switchdit_dist.parallel_dims import LayoutError, num_local_experts
from switchdit_dist.sample_placement import (
    fewest_leaving_pairs,
    leaving_pairs,
    owner_table,
    route_aware,
    slot_timesteps,
)

BYTES_PER_VALUE = 4  # fp32, as on CPU; bf16 halves both columns alike


@dataclass
class Row:
    router: str
    num_experts: int
    ep: int
    random_mb_per_step: float
    route_aware_mb_per_step: float
    floor_mb_per_step: float

    @property
    def ratio(self) -> float:
        return self.route_aware_mb_per_step / self.random_mb_per_step if self.random_mb_per_step else 1.0

    @property
    def floor_ratio(self) -> float:
        return self.floor_mb_per_step / self.random_mb_per_step if self.random_mb_per_step else 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a one-file Switch-DiT model (switchdit convert) whose router to use")
    parser.add_argument("--num-experts", type=int, default=8, help="experts of the untrained variant (8)")
    parser.add_argument("--expert-kind", default="mlp", help="experts of the untrained variant (mlp)")
    parser.add_argument("--ep", default="2,4", help="comma-separated expert-parallel sizes (2,4)")
    parser.add_argument("--steps", type=int, default=50, help="training steps averaged over (50)")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per rank and micro-step (8)")
    parser.add_argument("--accum", type=int, default=1, help="micro-steps per step (1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def measure(model, name: str, ep: int, steps: int, micro_batch: int, accum: int, seed: int) -> Row:
    config = model.config
    num_timesteps = 1000
    try:
        num_local = num_local_experts(config.num_experts, ep)
    except LayoutError as err:
        raise UserError(f"--ep {ep} for the {name} router: {err}") from None
    with torch.no_grad():
        owners = owner_table(model.route_table(torch.arange(num_timesteps)), num_local)
    pair_mb = 4 * config.num_patches * config.hidden_size * BYTES_PER_VALUE / 1e6
    random = aware = floor = 0
    for step in range(1, steps + 1):
        drawn = slot_timesteps(seed, step, ep * accum, micro_batch, num_timesteps)
        random += leaving_pairs(drawn, owners, ep, accum)
        aware += leaving_pairs(route_aware(drawn, owners, ep, accum), owners, ep, accum)
        floor += fewest_leaving_pairs(drawn, owners, ep)
    mb = [pairs * pair_mb / steps for pairs in (random, aware, floor)]
    return Row(name, config.num_experts, ep, *mb)


def run(args: argparse.Namespace) -> int:
    from switchdit_dist.models.registry import build_model, is_moe, model_config

    routers = []
    if args.model:
        from switchdit_dist.export.load import load_model

        model = load_model(args.model)
        if not is_moe(model.config):
            raise UserError(f"--model {args.model}: a DiT has no router; expected a Switch-DiT model file")
        routers.append((f"trained ({args.model})", model))
    torch.manual_seed(args.seed)
    untrained = model_config(
        "switch-dit", "tiny", 2, input_size=16, in_channels=1, num_classes=10,
        num_experts=args.num_experts, top_k=2, expert_kind=args.expert_kind,
    )  # fmt: skip
    routers.append(("untrained", build_model(untrained).eval()))
    eps = [int(e) for e in args.ep.split(",")]
    rows = [
        measure(model, name, ep, args.steps, args.micro_batch, args.accum, args.seed)
        for name, model in routers
        for ep in eps
    ]
    if args.json:
        rows_out = [asdict(r) | {"ratio": r.ratio, "floor_ratio": r.floor_ratio} for r in rows]
        print(json.dumps(rows_out, indent=1))
        return 0
    print(f"all-to-all MB per step (micro-batch {args.micro_batch} per rank, accum {args.accum}, fp32)")
    print("floor: every sample on its own cheapest EP rank, equal sample counts per rank dropped")
    header = f"{'router':<50} {'E':>3} {'EP':>3} {'random':>10} {'route_aware':>12} {'ratio':>6}"
    print(f"{header} {'floor':>8} {'floor/random':>13}")
    for r in rows:
        print(
            f"{r.router:<50} {r.num_experts:>3} {r.ep:>3} {r.random_mb_per_step:>10.2f} "
            f"{r.route_aware_mb_per_step:>12.2f} {r.ratio:>6.2f} {r.floor_mb_per_step:>8.2f} "
            f"{r.floor_ratio:>13.2f}"
        )
    return 0
