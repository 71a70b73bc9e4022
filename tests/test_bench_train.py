"""`switchdit bench train`: runs end to end on the tiny shape, reports consistent figures, uses the
trainer's loss, and measures memory correctly. Speed itself is not asserted."""

import json

import numpy as np
import pytest
import torch

from switchdit_dist.bench.train import (
    TINY,
    StepInputs,
    StorageTracker,
    TrainBenchConfig,
    TrainStep,
    largest_batch,
    make_inputs,
    measure_all,
)
from switchdit_dist.cli import main as cli_main
from switchdit_dist.errors import UserError
from switchdit_dist.models.registry import build_model, model_config


def test_cli_json_rows_are_consistent(capsys):
    assert cli_main(["bench", "train", "--tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["arch"], r["compiled"]) for r in rows] == [("dit", False), ("switch-dit", False)]
    for r in rows:
        overrides = dict(input_size=8, num_classes=10)
        expected = build_model(model_config(r["arch"], "tiny", 2, **overrides))
        params = sum(p.numel() for p in expected.parameters())
        assert r["params"] == params
        assert r["batch"] == TINY["batch"] and r["tokens"] == 16
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1e3), rel=1e-3)
        achieved = r["images_per_s"] * r["train_gflops_per_image"] / 1e3
        assert r["achieved_tflops"] == pytest.approx(achieved, rel=1e-2)
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / r["peak_tflops"], rel=1e-2)
        # Weights + AdamW's two moments stay allocated; the step's gradients come on top.
        assert r["peak_mem_mib"] > 4 * params * 4 / 2**20
        assert r["minor_faults_per_step"] >= 0  # counted on CPU (None on CUDA)
    dit, switch = rows
    assert switch["params"] > dit["params"]
    assert switch["train_gflops_per_image"] > dit["train_gflops_per_image"]


def test_cli_table_has_ratio_row(capsys):
    assert cli_main(["bench", "train", "--tiny", "--sdpa", "math"]) == 0
    out = capsys.readouterr().out
    assert "DiT-tiny/2" in out and "Switch-DiT-tiny/2" in out
    ratio_line = next(line for line in out.splitlines() if line.strip().startswith("Switch / DiT"))
    assert len(ratio_line.split()) == 10  # label (3 words) + 7 ratios
    assert "CPU heap: freed memory kept (mallopt)" in out  # glibc here: the default took


def test_compiled_and_bf16_variants_run_side_by_side():
    # Dynamo with the eager backend exercises the compile path in seconds (inductor takes minutes on CPU).
    config = TrainBenchConfig(**TINY, compile=True, compile_backend="eager", precision="bf16")
    rows, notes = measure_all(config)
    assert [(r.arch, r.compiled) for r in rows] == [
        ("dit", False),
        ("switch-dit", False),
        ("dit", True),
        ("switch-dit", True),
    ]
    assert notes["peak_tflops"] > 0
    assert all(r.precision == "bf16" and r.step_ms > 0 for r in rows)
    # CPU memory is tracked for eager steps only.
    assert [r.peak_mem_mib is None for r in rows] == [False, False, True, True]


def test_loss_is_the_trainers_diffusion_plus_prior_loss():
    """Against the loss written out from its parts: the model routing by itself, the prior loss of
    ``models/prior.py`` with the same permutations, the labels dropped as the draws say."""
    from switchdit_dist.diffusion import create_diffusion
    from switchdit_dist.models.prior import DiffusionPriorLoss

    config = TrainBenchConfig(**TINY)
    runner = TrainStep("switch-dit", "tiny", config, torch.device("cpu"))
    inputs = make_inputs(config, 3, 0, torch.device("cpu"))
    inputs.draws.drop = torch.tensor([True, False, False])  # one sample trains the null class
    got = runner.loss(inputs)

    model = runner.model
    diffusion = create_diffusion()
    t, noise = inputs.draws.t, inputs.draws.noise
    x_t = diffusion.q_sample(inputs.x0, t, noise)
    y = torch.where(inputs.draws.drop, torch.full_like(inputs.y, 10), inputs.y)
    out, gates = model(x_t, t, y, return_gates=True)
    expected = diffusion.losses(out, inputs.x0, x_t, t, noise)["loss"].mean()
    prior = DiffusionPriorLoss(model.config.depth, 3, 2)
    all_gates = model.gate_probs_for_timesteps(torch.arange(1000))
    expected = expected + prior(gates, t, all_gates, np.random.default_rng(inputs.prior_seed))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_steps_equal_a_plain_adamw_reference():
    from switchdit_dist.diffusion import create_diffusion

    config = TrainBenchConfig(**TINY)
    runner = TrainStep("dit", "tiny", config, torch.device("cpu"))
    torch.manual_seed(config.seed)
    reference = build_model(model_config("dit", "tiny", 2, input_size=8, num_classes=10)).train()
    optimizer = torch.optim.AdamW(
        [p for p in reference.parameters() if p.requires_grad], lr=1e-4, weight_decay=0
    )
    diffusion = create_diffusion()
    for i in range(3):
        inputs = make_inputs(config, 2, i, torch.device("cpu"))
        assert isinstance(runner.step(inputs), torch.Tensor)
        d = inputs.draws
        x_t = diffusion.q_sample(inputs.x0, d.t, d.noise)
        y = torch.where(d.drop, torch.full_like(inputs.y, 10), inputs.y)
        out = reference(x_t, d.t, y)
        diffusion.losses(out, inputs.x0, x_t, d.t, d.noise)["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    got = dict(runner.model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=0, atol=0, msg=name)
    assert got["final_layer.linear.weight"].abs().sum() > 0  # it trained
    assert all(p.grad is None for p in runner.model.parameters())  # gradients freed after each step


def test_bf16_step_keeps_bf16_weights_and_fp32_masters():
    config = TrainBenchConfig(**TINY, precision="bf16")
    runner = TrainStep("switch-dit", "tiny", config, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in runner.model.parameters())
    before = [m.clone() for m in runner.masters]
    runner.step(make_inputs(config, 2, 0, torch.device("cpu")))
    assert all(m.dtype == torch.float32 for m in runner.masters)
    assert any(not torch.equal(a, b) for a, b in zip(before, runner.masters))  # AdamW stepped the masters
    for master, p in zip(runner.masters, runner.params):
        assert torch.equal(p, master.to(torch.bfloat16))  # the module holds the masters, rounded


def test_inputs_are_identical_for_every_variant():
    config = TrainBenchConfig(**TINY)
    a, b = (make_inputs(config, 4, 7, torch.device("cpu")) for _ in range(2))
    assert isinstance(a, StepInputs)
    for name in ("x0", "y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    for name in ("t", "noise", "drop"):
        assert torch.equal(getattr(a.draws, name), getattr(b.draws, name))
    assert not torch.equal(a.x0, make_inputs(config, 4, 8, torch.device("cpu")).x0)


def test_storage_tracker_counts_live_allocations_only():
    mib = 2**20
    tracker = StorageTracker()
    with tracker:
        a = torch.empty(mib, dtype=torch.uint8)
        a.fill_(1)  # in place: same storage
        view = a.view(2, -1)  # view: same storage
        b = torch.empty(2 * mib, dtype=torch.uint8)
        assert tracker.live == 3 * mib
        del a, view
        assert tracker.live == 2 * mib
        c = torch.ones(mib // 2, dtype=torch.uint8)
        del b, c
    assert tracker.peak == 3 * mib
    assert tracker.live == 0


def test_largest_batch_doubles_until_it_no_longer_fits():
    assert largest_batch(lambda b: b <= 48) == 32
    assert largest_batch(lambda b: True, limit=256) == 256
    with pytest.raises(UserError, match="--batch"):
        largest_batch(lambda b: False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sizes", "S,Q"], "--sizes"),
        (["--batch", "0"], "--batch"),
        (["--batch", "many"], "--batch"),
        (["--batch", "auto", "--device", "cpu"], "--batch auto"),
        (["--steps", "0"], "--steps"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_are_reported(args, message, capsys):
    assert cli_main(["bench", "train", "--tiny", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_is_reported(capsys):
    assert cli_main(["bench", "train", "--tiny", "--device", "cuda"]) == 2
    assert "no CUDA device is available here" in capsys.readouterr().err
