"""parallel.placement=route_aware: the global batch's timesteps re-dealt to the ranks of their
experts, the same on every rank, without communication (training runs: test_train.py)."""

from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch

from switchdit_dist.diffusion import create_diffusion
from switchdit_dist.models.switch_dit import SwitchDiT, SwitchDiTConfig
from switchdit_dist.sample_placement import (
    fewest_leaving_pairs,
    leaving_pairs,
    owner_table,
    route_aware,
    slot_timesteps,
)
from switchdit_dist.train.faults import FaultInjector
from switchdit_dist.train.loop import StepRunner
from switchdit_dist.train.seeding import derive_seed
from switchdit_dist.train.step import Objective, draw


def random_owners(num_timesteps: int, pairs: int, ep_size: int, seed: int = 0) -> np.ndarray:
    """Each timestep's (block, slot) experts' EP ranks, smooth in t as a timestep router's are."""
    rng = np.random.default_rng(seed)
    bands = rng.integers(0, ep_size, size=(8, pairs))
    return bands[np.arange(num_timesteps) * 8 // num_timesteps]


def test_the_deal_keeps_every_timestep_and_each_rank_its_count():
    owners = random_owners(1000, 8, ep_size=4)
    drawn = torch.randint(0, 1000, (8 * 2, 6), generator=torch.Generator().manual_seed(1))  # 8 ranks, accum 2
    placed = route_aware(drawn, owners, ep_size=4, accum=2)
    assert placed.shape == drawn.shape
    assert Counter(placed.flatten().tolist()) == Counter(drawn.flatten().tolist())
    random_bytes, aware_bytes = leaving_pairs(drawn, owners, 4, 2), leaving_pairs(placed, owners, 4, 2)
    assert aware_bytes < random_bytes


def test_at_ep_2_the_deal_is_the_cheapest_possible():
    owners = random_owners(50, 4, ep_size=2, seed=3)
    drawn = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(2))  # 2 ranks, accum 1
    placed = route_aware(drawn, owners, ep_size=2, accum=1)
    flat = drawn.flatten().tolist()
    best = min(
        leaving_pairs(torch.tensor([flat[i] for i in perm]).view(2, 4), owners, 2, 1)
        for perm in itertools.permutations(range(8))
    )
    assert leaving_pairs(placed, owners, 2, 1) == best


def test_the_floor_is_the_cheapest_placement_with_free_counts():
    owners = random_owners(60, 6, ep_size=3, seed=4)
    drawn = torch.randint(0, 60, (3, 2), generator=torch.Generator().manual_seed(5))  # 3 ranks, accum 1
    flat = drawn.flatten().numpy()
    # Every sample on any rank, counts unconstrained: 3**6 placements.
    best = min(
        sum(int((owners[t] != r).sum()) for t, r in zip(flat, ranks, strict=True))
        for ranks in itertools.product(range(3), repeat=len(flat))
    )
    floor = fewest_leaving_pairs(drawn, owners, ep_size=3)
    assert floor == best
    aware = leaving_pairs(route_aware(drawn, owners, 3, 1), owners, 3, 1)
    assert floor <= aware <= leaving_pairs(drawn, owners, 3, 1)


def test_without_expert_parallelism_nothing_moves():
    owners = random_owners(100, 4, ep_size=1)
    drawn = torch.randint(0, 100, (4, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(route_aware(drawn, owners, ep_size=1, accum=2), drawn)


def test_every_rank_computes_the_same_deal_and_keeps_its_own_noise():
    config = SwitchDiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10,
        num_experts=4, top_k=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SwitchDiT(config)
    world, ep_size, accum, batch, seed, step = 4, 2, 2, 3, 7, 5
    # each slot draws its timesteps first, as train.step.draw does
    for slot in range(world * accum):
        own = draw(torch.Generator().manual_seed(derive_seed(seed, step, slot)), batch, (4, 8, 8), 1000)
        assert torch.equal(slot_timesteps(seed, step, world * accum, batch, 1000)[slot], own.t)

    def runner(rank: int) -> StepRunner:
        return StepRunner(
            engine=None, module=model, objective=Objective(create_diffusion(), config),
            guard=SimpleNamespace(last_step_skipped=False), faults=FaultInjector(rank), seed=seed,
            rank=rank, accum=accum, micro_batch=batch, latent_shape=(4, 8, 8), num_timesteps=1000,
            class_dropout_prob=0.1, device=torch.device("cpu"), placement="route_aware",
            world_size=world, ep_size=ep_size, num_local_experts=2,
        )  # fmt: skip

    placed, drawn = [], []
    for rank in range(world):
        r = runner(rank)
        own = [r.draws(step, m) for m in range(accum)]
        mine = r.place(step, own)
        for a, b in zip(own, mine):
            assert torch.equal(a.noise, b.noise) and torch.equal(a.drop, b.drop)
        drawn += [d.t for d in own]
        placed += [d.t for d in mine]
    assert Counter(torch.cat(placed).tolist()) == Counter(torch.cat(drawn).tolist())
    with torch.no_grad():
        owners = owner_table(model.route_table(torch.arange(1000)), 2)
    assert leaving_pairs(torch.stack(placed), owners, ep_size, accum) <= leaving_pairs(
        torch.stack(drawn), owners, ep_size, accum
    )


def test_bench_placement_rows_add_up(tmp_path, capsys):
    import json

    from switchdit_dist.cli import main
    from switchdit_dist.export.load import save_model_file
    from switchdit_dist.models.registry import build_model, model_config

    config = model_config("switch-dit", "tiny", 2, input_size=8, in_channels=4, num_experts=4, top_k=2)
    torch.manual_seed(1)
    model = build_model(config)
    path = tmp_path / "model.safetensors"
    save_model_file(path, model.state_dict(), config)
    assert main(["bench", "placement", "--model", str(path), "--steps", "5", "--ep", "2,4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["router"].split()[0], r["num_experts"], r["ep"]) for r in rows] == [
        ("trained", 4, 2), ("trained", 4, 4), ("untrained", 8, 2), ("untrained", 8, 4)
    ]  # fmt: skip
    for r in rows:
        assert 0 <= r["floor_mb_per_step"] <= r["route_aware_mb_per_step"] <= r["random_mb_per_step"]
        assert 0 < r["random_mb_per_step"]
        assert r["ratio"] == r["route_aware_mb_per_step"] / r["random_mb_per_step"]
        assert r["floor_ratio"] == r["floor_mb_per_step"] / r["random_mb_per_step"]
