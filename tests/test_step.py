"""The training step (``train/step.py``): one objective for the trainer, validation and `bench train`;
draws from explicit generators only; routes, expert counts and prior matching planned once per step,
after which a micro-step never reads a value back from the device."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from switchdit_dist.config import Config
from switchdit_dist.diffusion import create_diffusion
from switchdit_dist.models.prior import DiffusionPriorLoss
from switchdit_dist.models.switch_dit import Routes, SwitchDiT, SwitchDiTConfig
from switchdit_dist.moe.layer import expert_parallel_factory
from switchdit_dist.train import step as step_module
from switchdit_dist.train.metrics import IntervalStats
from switchdit_dist.train.step import Draws, MicroPlan, Objective, draw

LATENT = (4, 8, 8)


def tiny_config(**overrides) -> SwitchDiTConfig:
    values = dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10
    )
    return SwitchDiTConfig(**{**values, "num_experts": 4, "top_k": 2, **overrides})


def random_model(config: SwitchDiTConfig, seed: int = 0) -> SwitchDiT:
    """The trainer's experts layer (EP size 1), with random weights so routes and experts matter."""
    torch.manual_seed(seed)
    model = SwitchDiT(config, expert_parallel_factory(1))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    return model


def draws_for(batches: int, batch: int = 3, seed: int = 0) -> list[Draws]:
    generator = torch.Generator().manual_seed(seed)
    return [draw(generator, batch, LATENT, 1000, 0.5) for _ in range(batches)]


# --------------------------------------------------------------------------- draws


def test_draws_come_from_the_given_generator_only():
    a, b = draws_for(2), draws_for(2)
    for x, y in zip(a, b):
        assert torch.equal(x.t, y.t) and torch.equal(x.noise, y.noise) and torch.equal(x.drop, y.drop)
    assert not torch.equal(a[0].t, a[1].t)
    assert draw(torch.Generator(), 3, LATENT, 1000, 0.0).drop is None
    # The whole micro-step, in training mode with label dropout, leaves the global generator alone.
    config = tiny_config()
    model = random_model(config).train()
    x0 = torch.randn(3, *LATENT)
    state = torch.get_rng_state()
    objective = Objective(create_diffusion(), config)
    plans = objective.plan(model, [d.t for d in a], np.random.default_rng(0))
    batch = objective.inputs(x0, torch.arange(3), a[0], torch.device("cpu"))
    objective(model, batch, plans[0]).loss.backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_label_dropout_gives_the_null_class_to_the_drawn_samples():
    objective = Objective(create_diffusion(), tiny_config())
    draws = Draws(
        torch.zeros(3, dtype=torch.long), torch.zeros(3, *LATENT), torch.tensor([True, False, True])
    )
    batch = objective.inputs(torch.zeros(3, *LATENT), torch.tensor([1, 2, 3]), draws, torch.device("cpu"))
    assert batch.y.tolist() == [10, 2, 10]
    with pytest.raises(ValueError, match="micro-batch of 2 samples"):
        objective.inputs(torch.zeros(2, *LATENT), torch.tensor([1, 2]), draws, torch.device("cpu"))


# --------------------------------------------------------------------------- the plan


def test_plan_routes_and_counts_equal_the_models_own_routing():
    config = tiny_config()
    model = random_model(config)
    draws = draws_for(2)
    objective = Objective(create_diffusion(), config)
    plans = objective.plan(model, [d.t for d in draws], np.random.default_rng(0))
    assert len(plans) == 2
    for d, plan in zip(draws, plans):
        t_emb = model.t_embedder(d.t)
        for block_id, block in enumerate(model.blocks):
            _, index, _ = block.router(t_emb)
            assert torch.equal(plan.routes.index[:, block_id], index)
            counts = torch.bincount(index.reshape(-1), minlength=4)
            assert torch.equal(plan.routes.expert_counts[block_id], counts[None])  # [ep_size=1, E]
            assert torch.equal(plan.route_counts[block_id], counts)
        assert torch.allclose(plan.prior_target.sum(-1), torch.ones(3))
    # The forward with the planned routes is the forward that routes by itself, gradients included.
    x = torch.randn(3, *LATENT)
    y = torch.tensor([1, 2, 3])
    results = []
    for routes in (None, plans[0].routes):
        model.zero_grad()
        out, gates = model(x, draws[0].t, y, return_gates=True, routes=routes)
        (out.square().sum() + gates.square().sum()).backward()
        results.append((out, gates, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (out_a, gates_a, grads_a), (out_b, gates_b, grads_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(gates_a, gates_b)
    assert len(grads_a) == len(grads_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_prior_loss_from_the_plan_equals_the_prior_loss_module():
    config = tiny_config()
    model = random_model(config)
    diffusion = create_diffusion()
    objective = Objective(diffusion, config)
    d = draws_for(1)[0]
    plan = objective.plan(model, [d.t], np.random.default_rng(7))[0]
    x0, y = torch.randn(3, *LATENT), torch.tensor([4, 5, 6])
    terms = objective(model, objective.inputs(x0, y, Draws(d.t, d.noise), torch.device("cpu")), plan)

    x_t = diffusion.q_sample(x0, d.t, d.noise)
    out, gates = model(x_t, d.t, y, return_gates=True)
    prior = DiffusionPriorLoss(config.depth, 4, 2)(
        gates, d.t, model.gate_probs_for_timesteps(torch.arange(1000)), np.random.default_rng(7)
    )
    diffusion_loss = diffusion.losses(out, x0, x_t, d.t, d.noise)["loss"]
    assert torch.equal(terms.prior, prior.detach())
    assert torch.equal(terms.per_sample["loss"], diffusion_loss.detach())
    assert torch.equal(terms.loss, diffusion_loss.mean() + config.prior_loss_weight * prior)


def test_dense_model_has_no_plan_and_no_prior():
    from switchdit_dist.models.dit import DiT, DiTConfig

    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4)
    objective = Objective(create_diffusion(), config)
    d = draws_for(1)[0]
    assert objective.plan(DiT(config), [d.t], np.random.default_rng(0)) is None
    batch = objective.inputs(torch.randn(3, *LATENT), torch.arange(3), d, torch.device("cpu"))
    terms = objective(DiT(config), batch, None)
    assert terms.prior is None and torch.equal(terms.loss, terms.per_sample["loss"].mean())


# --------------------------------------------------------------------------- no device reads


class HostCopies(TorchDispatchMode):
    """Records the copies from the host to another device that wait for it (``non_blocking=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src, device = args[0], kwargs.get("device")
            if src.device.type == "cpu" and device is not None and device.type != "cpu":
                if not kwargs.get("non_blocking", False):
                    self.blocking.append((tuple(src.shape), src.dtype))
        return func(*args, **kwargs)


def test_a_planned_micro_step_never_reads_the_device():
    """Meta tensors have no values: any ``.item()``, ``.tolist()``, ``nonzero`` or data-dependent
    shape in forward, loss, backward or metrics raises. Run there, after the plan, the micro-step
    proves it leaves the device alone; on a GPU it then queues kernels without waiting."""
    config = tiny_config()
    model = random_model(config)
    objective = Objective(create_diffusion(), config)
    draws = draws_for(1)[0]
    plan = objective.plan(model, [draws.t], np.random.default_rng(0))[0]
    meta = torch.device("meta")
    on_meta = copy.deepcopy(model).to(meta)
    plan = MicroPlan(
        Routes(plan.routes.index.to(meta), plan.routes.expert_counts),
        plan.route_counts,
        plan.prior_target.to(meta),
    )
    stats = IntervalStats(1000, config.depth, config.num_experts)
    copies = HostCopies()
    with copies:
        batch = objective.inputs(torch.randn(3, *LATENT), torch.arange(3), draws, meta)
        terms = objective(on_meta, batch, plan)
        terms.loss.backward()
        stats.add_micro(terms.per_sample, terms.prior, batch.t, plan.route_counts)
    assert terms.loss.device == meta and stats.bucket_loss.device == meta
    # The step's own copies do not wait. The noise schedule's tables (float64 [T]), copied by the
    # diffusion module on every use, are the only ones left.
    assert set(copies.blocking) <= {((1000,), torch.float64)}, copies.blocking


# --------------------------------------------------------------------------- one objective everywhere


class RecordingEngine:
    """The part of a DeepSpeed engine the trainer's micro-step uses: forward, backward, step."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.losses: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        loss.backward()

    def step(self) -> None:
        self.module.zero_grad(set_to_none=True)


def test_trainer_validation_and_bench_compute_the_same_loss(monkeypatch, tmp_path):
    from switchdit_dist.bench.train import TINY, StepInputs, TrainBenchConfig, TrainStep
    from switchdit_dist.train.faults import FaultInjector
    from switchdit_dist.train.loop import StepRunner
    from switchdit_dist.train.validation import FixedBatch, Validator

    # The prior matching breaks ties with a permutation each caller seeds its own way; fix it.
    match = step_module.match_units
    monkeypatch.setattr(step_module, "match_units", lambda p, q, rng: match(p, q, np.random.default_rng(0)))

    bench = TrainStep("switch-dit", "tiny", TrainBenchConfig(**TINY), torch.device("cpu"))
    with torch.no_grad():
        for p in bench.model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    model_config = bench.model_config
    model = copy.deepcopy(bench.model)
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    y = torch.randint(0, 10, (4,), generator=generator)
    draws = Draws(torch.tensor([0, 250, 600, 999]), torch.randn(4, 4, 8, 8, generator=generator))

    bench_loss = bench.loss(StepInputs(x0, y, draws, prior_seed=0))

    config = Config()
    trainer = StepRunner(
        engine=RecordingEngine(model),
        module=model,
        objective=Objective(create_diffusion(), model_config),
        guard=SimpleNamespace(last_step_skipped=False),
        faults=FaultInjector(0),
        seed=config.train.seed,
        rank=0,
        accum=1,
        micro_batch=4,
        latent_shape=(4, 8, 8),
        num_timesteps=1000,
        class_dropout_prob=model_config.class_dropout_prob,
        device=torch.device("cpu"),
    )
    stats = IntervalStats(1000, model_config.depth, model_config.num_experts)
    batch = SimpleNamespace(latent=x0, cls=y, keys=[f"k{i}" for i in range(4)])
    plan = trainer.plan(1, [draws])
    returned = trainer.micro_step(batch, draws, plan[0], 1, 0, stats)
    [trainer_loss] = trainer.engine.losses
    assert returned.item() == trainer_loss.item()

    validator = Validator.of_batches([FixedBatch(x0, y, draws.t, draws.noise)], num_timesteps=1000, seed=0)
    record = validator.evaluate(copy.deepcopy(bench.model), trainer.objective)
    validation_loss = record["val_loss"] + model_config.prior_loss_weight * record["val_prior"]

    assert record["val_prior"] > 0
    assert trainer_loss.item() == bench_loss.item()
    assert validation_loss == pytest.approx(trainer_loss.item(), rel=1e-6)
    logged = stats.reduce()
    assert logged["loss"] + logged["prior"] == pytest.approx(trainer_loss.item(), rel=1e-6)
    assert trainer.nonfinite_batch[0]["t"].tolist() == draws.t.tolist()  # kept as tensors until needed


# --------------------------------------------------------------------------- metrics


def test_interval_stats_reduce_matches_the_plain_means():
    stats = IntervalStats(num_timesteps=1000, num_blocks=2, num_experts=3)
    losses = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])]
    timesteps = [torch.tensor([0, 150, 999]), torch.tensor([10, 160, 990])]
    counts = torch.tensor([[2, 3, 1], [0, 3, 3]])
    for loss, t in zip(losses, timesteps):
        per_sample = {"loss": loss, "mse": loss / 2, "vlb": loss / 2}
        stats.add_micro(per_sample, torch.tensor(0.25), t, counts)
    record = stats.reduce()
    assert record["loss"] == pytest.approx(3.5) and record["mse"] == pytest.approx(1.75)
    assert record["prior"] == pytest.approx(0.25) and record["samples"] == 6
    assert record["loss_t0"] == pytest.approx(2.5) and record["loss_t1"] == pytest.approx(3.5)
    assert record["loss_t9"] == pytest.approx(4.5) and math.isnan(record["loss_t5"])
    assert record["route_frac"] == [[4 / 6, 1.0, 2 / 6], [0.0, 1.0, 1.0]]
