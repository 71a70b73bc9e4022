"""Resuming a checkpoint on another layout (2 -> 1 and 1 -> 2 processes; EP 2 -> 1 with ZeRO 2 -> 0
on the same processes), and converting an expert-parallel run into one file that reproduces the
distributed model.

Why the losses of different layouts can be compared step by step:

- data: every sample of the data set is the same image of the same class, so which rank reads
  which shard, and the loader starting a new epoch after a layout change, cannot matter;
- randomness: timesteps, noise, label dropout and the prior's permutation are seeded by
  (seed, step, slot), slot = rank x accumulation steps + micro-step. With micro-batch 8 and global
  batch 16, slot s is rank s on 2 processes and micro-step s on 1 process.

So the 5 steps after a resharded resume must repeat the losses of the run that kept its layout.
The state right after the resume is read back from the resumed engine (DeepSpeed's public
full-tensor getters) and compared with the source checkpoint's entries, read here in one process.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_distributed
from test_train import CONFIG, launch, losses_by_step

from switchdit_dist.train import param_names

pytestmark = pytest.mark.slow

STEPS, RESUME_AT = 8, 3
COMMON = [f"train.steps={STEPS}", f"checkpoint.every={RESUME_AT}", "logging.gate_image_every=0"]


# --- data and runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def same_sample_data(tmp_path_factory) -> Path:
    """Shards in which every sample is one fixed image of class 0 (plus the validation split the
    shared ``launch`` helper expects in ``val/``)."""
    from switchdit_dist.data.writers.npyfolder import NpyOptions, write_npy_folder

    root = tmp_path_factory.mktemp("same_sample")
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    image = (np.sin(3 * xx) * np.cos(2 * yy)).astype(np.float32)[None]
    for split, count, out in (("train", 256, root / "data"), ("val", 64, root / "data" / "val")):
        folder = root / f"src_{split}" / "only_class"
        folder.mkdir(parents=True)
        np.save(folder / "all.npy", np.repeat(image[None], count, axis=0))
        write_npy_folder(
            NpyOptions(src=str(folder.parent), out=str(out), samples_per_shard=64), log=lambda *a: None
        )
    return root / "data" / "manifest.json"


def trained(run_dir: Path, data: Path, nproc: int, ep_size: int) -> Path:
    proc = launch(run_dir, data, *COMMON, f"parallel.ep_size={ep_size}", nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def run_2proc(tmp_path_factory, same_sample_data) -> Path:
    return trained(tmp_path_factory.mktemp("ref") / "two", same_sample_data, nproc=2, ep_size=2)


@pytest.fixture(scope="module")
def run_1proc(tmp_path_factory, same_sample_data) -> Path:
    return trained(tmp_path_factory.mktemp("ref") / "one", same_sample_data, nproc=1, ep_size=1)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def copy_of_checkpoint(run_dir: Path, step: int, new_run: Path) -> Path:
    """A new run directory holding only ``run_dir``'s checkpoint of ``step``."""
    (new_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint_dir(run_dir, step), checkpoint_dir(new_run, step))
    (new_run / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return new_run


def fixed_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank inputs: different timesteps route samples to experts on both ranks; 10 is the null class."""
    generator = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(3, 1, 16, 16, generator=generator)
    return x, torch.tensor([0, 500 + rank, 999]), torch.tensor([rank, 5, 10])


def engine_full_state(engine, placement) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master and Adam state on this rank, by checkpoint key (flat), read back
    from the engine: DeepSpeed's public full-tensor getters under ZeRO 1/2 (collective), the torch
    optimizer's own tensors under ZeRO 0."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from switchdit_dist.train import deepspeed_adapter
    from switchdit_dist.train.engine_state import OptimizerView, global_parameters

    view = OptimizerView(engine)
    out = {}
    for _, name, p in global_parameters(engine.module, placement):
        partitioned = deepspeed_adapter.is_partitioned(p)
        weight = safe_get_full_fp32_param(p) if partitioned else (view.master(p) if p.requires_grad else p)
        out[f"model/{name}"] = weight.detach().float().flatten().cpu().clone()
        if not p.requires_grad:  # a fixed buffer-like weight (the position embedding): no Adam state
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            moment = safe_get_full_optimizer_state(p, key) if partitioned else view.state(p)[key]
            out[f"optim/{name}/{key}"] = moment.detach().float().flatten().cpu().clone()
        if not partitioned or deepspeed_adapter.fragment(p) is not None:
            out[f"optim/{name}/step"] = view.state(p)["step"].detach().float().cpu().reshape(()).clone()
    return out


def resume_worker(rank: int, world: int, run_dir: str, overrides: list[str], with_outputs: bool) -> bytes:
    """The real trainer on ``world`` processes, resuming ``run_dir``; returns the state right after
    the resume (read back from the engine, by global name) and, on request, the model's outputs on
    fixed inputs after training (raw and EMA weights)."""
    from switchdit_dist.config import load_config, validate
    from switchdit_dist.train import distributed
    from switchdit_dist.train.loop import Trainer

    config = load_config(CONFIG, overrides)
    validate(config, world)
    env = distributed.setup(config.parallel.backend, config.parallel.timeout_s)
    trainer = Trainer(config, Path(run_dir), env)  # built and resumed
    placement = trainer.placement
    captured: dict = {"step": trainer.start_step}
    captured["state"] = engine_full_state(trainer.engine, placement)
    captured["ema"] = {
        param_names.to_global(n, placement.ep_rank, placement.num_local_experts): v.clone()
        for n, v in trainer.ema.state_dict().items()
    }
    assert trainer.run() == 0
    if with_outputs:
        module = trainer.module.eval()
        x, t, y = fixed_inputs(rank)
        with torch.no_grad():
            captured["raw"] = module(x, t, y).clone()
            for name, p in module.named_parameters():
                p.copy_(trainer.ema.shadow[name])
            captured["ema_out"] = module(x, t, y).clone()
    # As bytes: tensors sent through a multiprocessing queue live in shared memory that ends with
    # this process.
    buffer = io.BytesIO()
    torch.save(captured, buffer)
    return buffer.getvalue()


def resumed(
    run_dir: Path, data: Path, world: int, ep_size: int, with_outputs: bool = False, zero_stage: int = 2
) -> dict:
    overrides = [
        f"data.shards={data}",
        *COMMON,
        f"parallel.ep_size={ep_size}",
        f"parallel.zero_stage={zero_stage}",
        "logging.tensorboard=false",
    ]
    results = [
        torch.load(io.BytesIO(raw), weights_only=True)
        for raw in run_distributed(resume_worker, world, str(run_dir), overrides, with_outputs, timeout=300)
    ]
    merged = {"state": {}, "ema": {}, "step": results[0]["step"], "ranks": results}
    for result in results:
        merged["state"].update(result["state"])
        merged["ema"].update(result["ema"])
    return merged


@pytest.fixture(scope="module")
def two_to_one(tmp_path_factory, run_2proc, same_sample_data):
    run_dir = copy_of_checkpoint(run_2proc, RESUME_AT, tmp_path_factory.mktemp("resharded") / "to_one")
    return run_dir, resumed(run_dir, same_sample_data, world=1, ep_size=1)


@pytest.fixture(scope="module")
def one_to_two(tmp_path_factory, run_1proc, same_sample_data):
    run_dir = copy_of_checkpoint(run_1proc, RESUME_AT, tmp_path_factory.mktemp("resharded") / "to_two")
    return run_dir, resumed(run_dir, same_sample_data, world=2, ep_size=2, with_outputs=True)


@pytest.fixture(scope="module")
def ep1_zero0(tmp_path_factory, run_2proc, same_sample_data):
    run_dir = copy_of_checkpoint(run_2proc, RESUME_AT, tmp_path_factory.mktemp("resharded") / "zero0")
    return run_dir, resumed(run_dir, same_sample_data, world=2, ep_size=1, zero_stage=0)


# --- the source checkpoint, read in one process ------------------------------------------------------


def checkpoint_entries(ckpt: Path) -> dict[str, torch.Tensor]:
    from switchdit_dist.checkpoint import dcp_io, store

    keys = [k for k in dcp_io.tensor_index(ckpt) if not k.startswith("trainer/")]
    return store.read_entries(ckpt, keys)


def assert_state_carried_over(ckpt: Path, after: dict) -> None:
    saved = checkpoint_entries(ckpt)
    assert after["step"] == RESUME_AT
    state = after["state"]
    weights = {k for k in saved if k.startswith("model/")}
    assert {k for k in state if k.startswith("model/")} == weights
    for key in weights:
        assert torch.equal(state[key], saved[key]), key
    adam = {k for k in saved if k.startswith("optim/")}
    assert {k for k in state if k.startswith("optim/")} == adam
    for key in adam:
        assert torch.equal(state[key], saved[key]), key
    # real moments, not fresh zero states (an expert no sample was routed to keeps zeros)
    second = [k for k in adam if k.endswith("/exp_avg_sq")]
    assert sum(bool(saved[k].abs().sum() > 0) for k in second) > 0.8 * len(second)
    ema = {k[len("ema/") :]: v for k, v in saved.items() if k.startswith("ema/")}
    assert after["ema"].keys() == ema.keys()
    for name, value in ema.items():
        assert torch.equal(after["ema"][name], value), name


def assert_same_losses(resumed_run: Path, reference_run: Path) -> None:
    got, want = losses_by_step(resumed_run), losses_by_step(reference_run)
    assert sorted(got) == list(range(RESUME_AT + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


# --- tests -------------------------------------------------------------------------------------------


def test_two_process_checkpoint_resumes_on_one_process(run_2proc, two_to_one):
    run_dir, after = two_to_one
    source = checkpoint_dir(run_2proc, RESUME_AT)
    assert json.loads((source / "meta.json").read_text())["world_size"] == 2
    assert_state_carried_over(source, after)
    assert_same_losses(run_dir, run_2proc)
    # the resumed run wrote its own checkpoints, in the new layout
    assert json.loads((checkpoint_dir(run_dir, STEPS) / "meta.json").read_text())["world_size"] == 1


def test_one_process_checkpoint_resumes_on_two_processes(run_1proc, one_to_two):
    run_dir, after = one_to_two
    source = checkpoint_dir(run_1proc, RESUME_AT)
    assert json.loads((source / "meta.json").read_text())["ep_size"] == 1
    assert_state_carried_over(source, after)
    assert_same_losses(run_dir, run_1proc)
    assert json.loads((checkpoint_dir(run_dir, STEPS) / "meta.json").read_text())["ep_size"] == 2


def test_ep2_zero2_checkpoint_resumes_at_ep1_zero0_on_the_same_processes(run_2proc, ep1_zero0):
    """Same processes, experts replicated instead of sharded and no ZeRO partitioning: each rank
    keeps its own data position and RNG state (the same number of ranks), so the losses match."""
    run_dir, after = ep1_zero0
    assert_state_carried_over(checkpoint_dir(run_2proc, RESUME_AT), after)
    assert_same_losses(run_dir, run_2proc)
    meta = json.loads((checkpoint_dir(run_dir, STEPS) / "meta.json").read_text())
    assert (meta["zero_stage"], meta["ep_size"]) == (0, 1)


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_converted_expert_parallel_run_reproduces_its_outputs(one_to_two, tmp_path, weights):
    """The 2-process, EP-2 run's final checkpoint, merged into one file and loaded on one device,
    gives the outputs the distributed model gave on the same inputs."""
    from switchdit_dist.export.convert import ConvertOptions, convert
    from switchdit_dist.export.load import load_model

    run_dir, after = one_to_two
    out = tmp_path / f"{weights}.safetensors"
    path, step = convert(ConvertOptions(str(run_dir), str(out), weights=weights))
    assert step == STEPS and json.loads((path / "meta.json").read_text())["ep_size"] == 2
    model = load_model(out)
    key = "raw" if weights == "model" else "ema_out"
    for rank, result in enumerate(after["ranks"]):
        with torch.no_grad():
            ours = model(*fixed_inputs(rank))
        distributed_out = result[key]
        error = ((ours - distributed_out).norm() / distributed_out.norm()).item()
        assert error < 1e-5, (rank, error)
