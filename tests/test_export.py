"""``switchdit convert`` on a real 2-process (EP 2, ZeRO-2) checkpoint, its refusals of bad
checkpoints (each leaves nothing behind), and ``switchdit sample`` from the converted file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import REPO, digits, launch  # noqa: F401  (digits is a fixture)

from switchdit_dist.errors import UserError
from switchdit_dist.export.convert import ConvertOptions, convert
from switchdit_dist.train import param_names

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):  # noqa: F811
    """Two steps on 2 processes, a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    proc = launch(run_dir, digits, "train.steps=2", "checkpoint.every=1", "logging.gate_image_every=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def ema_file(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "ema.safetensors"
    convert(ConvertOptions(str(run), str(out)))
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "switchdit_dist.cli", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def copy_step(run_dir: Path, step: int, dest: Path) -> Path:
    target = dest / f"step_{step:08d}"
    shutil.copytree(step_dir(run_dir, step), target)
    return target


# --- conversion -------------------------------------------------------------------------------------


def test_convert_command_merges_every_expert_of_the_newest_checkpoint(run, tmp_path):
    from switchdit_dist.export.load import read_model_metadata

    out = tmp_path / "ema.safetensors"
    proc = cli("convert", str(run), str(out), "--weights", "ema")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2" in proc.stdout
    config, metadata = read_model_metadata(out)
    assert (config.num_experts, config.depth) == (4, 4)
    assert metadata["step"] == "2" and metadata["weights"] == "ema"
    assert json.loads(metadata["diffusion"]) == {"num_timesteps": 1000, "noise_schedule": "linear"}
    merged = load_file(str(out))
    # the two expert-parallel ranks' EMA shards, renamed to nothing: already global names
    expected = {}
    for file in step_dir(run, 2).glob("ema_*.safetensors"):
        expected.update(load_file(str(file)))
    assert merged.keys() == expected.keys()
    assert {f"blocks.{b}.moe.experts.{e}.weight" for b in range(4) for e in range(4)} <= merged.keys()
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key


def test_model_weights_come_from_deepspeed_files_and_cast_to_bf16(run, tmp_path):
    out = tmp_path / "model.safetensors"
    convert(ConvertOptions(str(step_dir(run, 1)), str(out), weights="model", dtype="bf16"))
    merged = load_file(str(out))
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    ckpt = step_dir(run, 1)
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    for key, value in module.items():
        assert torch.equal(merged[key], value.to(torch.bfloat16)), key
    expert = torch.load(ckpt / "layer_2_expert_3_mp_rank_00_model_states.pt", weights_only=True)
    for key, value in expert.items():
        assert torch.equal(merged[param_names.to_global(key, 0, 4)], value.to(torch.bfloat16)), key


def refused(checkpoint: Path, tmp_path: Path, message: str, weights: str = "ema") -> None:
    """convert refuses with ``message`` and leaves its output folder empty."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UserError, match=message):
        convert(ConvertOptions(str(checkpoint), str(out_dir / "model.safetensors"), weights=weights))
    assert list(out_dir.iterdir()) == []


def test_missing_directory_is_refused(tmp_path):
    refused(tmp_path / "nope", tmp_path, r"nope: no such directory")


def test_run_without_complete_checkpoint_is_refused(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    for marker in copy.glob("checkpoints/step_*/COMPLETE"):
        marker.unlink()
    refused(copy, tmp_path, r"no complete checkpoint under .*checkpoints")


def test_incomplete_checkpoint_is_refused(run, tmp_path):
    ckpt = copy_step(run, 2, tmp_path)
    (ckpt / "COMPLETE").unlink()
    refused(ckpt, tmp_path, r"step_00000002: incomplete checkpoint \(no COMPLETE marker")


def test_missing_expert_file_is_refused(run, tmp_path):
    ckpt = copy_step(run, 2, tmp_path)
    (ckpt / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    refused(ckpt, tmp_path, r"lacks layer_1_expert_2_mp_rank_00_model_states\.pt", weights="model")


def test_missing_ema_shard_is_refused(run, tmp_path):
    ckpt = copy_step(run, 2, tmp_path)
    (ckpt / "ema_experts_ep1.safetensors").unlink()
    refused(ckpt, tmp_path, r"lacks ema_experts_ep1\.safetensors")


@pytest.mark.parametrize(
    ("weights", "file"),
    [
        ("ema", "ema_experts_ep0.safetensors"),
        ("model", "mp_rank_00_model_states.pt"),
        ("ema", "side_rank_1.pt"),
    ],
)
def test_file_from_another_step_is_refused(run, tmp_path, weights, file):
    ckpt = copy_step(run, 2, tmp_path)
    shutil.copy(step_dir(run, 1) / file, ckpt / file)
    message = rf"mixes files from different steps: meta\.json says step 2, but {re.escape(file)} \(step 1\)"
    refused(ckpt, tmp_path, message, weights=weights)


def test_expert_file_of_another_expert_is_refused(run, tmp_path):
    ckpt = copy_step(run, 2, tmp_path)
    shutil.copy(
        ckpt / "layer_0_expert_1_mp_rank_00_model_states.pt",
        ckpt / "layer_0_expert_0_mp_rank_00_model_states.pt",
    )
    refused(
        ckpt,
        tmp_path,
        r"layer_0_expert_0_mp_rank_00_model_states\.pt: holds .*, which is not expert 0",
        "model",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": "S"}, r"tensors do not match the model config; missing: .*wrong shape: .*\(config expects"),
        ({"top_k": 5}, r"invalid model section"),
        ({"num_experts": 2}, r"expert files beyond the model config"),
    ],
)
def test_files_of_another_model_are_refused(run, tmp_path, change, message):
    """meta.json describing another model than the one whose files are in the folder."""
    ckpt = copy_step(run, 2, tmp_path)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model"].update(change)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    refused(ckpt, tmp_path, message, weights="model" if "num_experts" in change else "ema")


def test_unreadable_meta_and_missing_output_folder_are_refused(run, tmp_path):
    ckpt = copy_step(run, 2, tmp_path)
    (ckpt / "meta.json").write_text("{not json")
    refused(ckpt, tmp_path, r"meta\.json: not valid JSON")
    with pytest.raises(UserError, match=r"the output folder .*missing does not exist"):
        convert(ConvertOptions(str(run), str(tmp_path / "missing" / "m.safetensors")))


def test_convert_command_prints_the_refusal_without_traceback(tmp_path):
    proc = cli("convert", str(tmp_path / "nope"), str(tmp_path / "m.safetensors"))
    assert proc.returncode == 2
    assert "switchdit convert: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.safetensors").exists()


# --- sampling ----------------------------------------------------------------------------------------


def test_sample_command_writes_grid_and_npz(ema_file, tmp_path):
    grid, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    proc = cli(
        "sample", "--checkpoint", str(ema_file), "--classes", "0,1,2", "--per-class", "2",
        "--cfg-scale", "1.5", "--steps", "5", "--seed", "3", "--device", "cpu",
        "--out", str(grid), "--npz", str(npz),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["labels"]
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 3)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert images.std() > 0
    picture = np.asarray(Image.open(grid).convert("RGB"))
    assert picture.shape == (3 * 18 + 2, 2 * 18 + 2, 3)  # one row per class, 2-pixel gaps
    for index, image in enumerate(images):
        row, col = divmod(index, 2)
        assert np.array_equal(picture[2 + row * 18 : 18 + row * 18, 2 + col * 18 : 18 + col * 18], image)


def test_same_seed_same_samples_and_bad_options_refused(ema_file, tmp_path):
    from switchdit_dist.export.sample import SampleOptions, sample

    def draw(seed: int, **kw):
        return sample(
            SampleOptions(
                str(ema_file),
                [4, 7],
                str(tmp_path / "g.png"),
                per_class=1,
                steps=3,
                seed=seed,
                device="cpu",
                **kw,
            )
        )[0]

    assert np.array_equal(draw(1), draw(1))
    assert not np.array_equal(draw(1), draw(2))
    with pytest.raises(UserError, match=r"--classes \[12\]: the model has classes 0\.\.9"):
        sample(SampleOptions(str(ema_file), [1, 12], str(tmp_path / "g.png"), steps=2))
    with pytest.raises(UserError, match=r"--noise-schedule: expected one of"):
        draw(1, noise_schedule="quadratic")
    with pytest.raises(UserError, match=r"--out .*: the folder .* does not exist"):
        SampleOptions(str(ema_file), [1], str(tmp_path / "no" / "g.png"))


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    """A 4-channel latent Switch-DiT (untrained) and a small AutoencoderKL saved to a local folder."""
    from diffusers import AutoencoderKL

    from switchdit_dist.export.load import save_model_file
    from switchdit_dist.models.registry import build_model, model_config

    folder = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    config = model_config("switch-dit", "tiny", 2, input_size=8, in_channels=4, num_classes=10)
    save_model_file(folder / "latent.safetensors", build_model(config).state_dict(), config)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    )
    vae.save_pretrained(folder / "vae")
    return folder / "latent.safetensors", folder / "vae", vae.eval()


def test_latent_model_decodes_through_the_vae(latent_model, tmp_path):
    from switchdit_dist.eval.sampling import SamplingConfig, sample_class_conditional
    from switchdit_dist.export.load import load_model
    from switchdit_dist.export.sample import SampleOptions, sample, to_uint8_images

    model_file, vae_dir, vae = latent_model
    with pytest.raises(UserError, match=r"latent model \(4 channels\): pass --vae"):
        sample(SampleOptions(str(model_file), [0], str(tmp_path / "g.png"), steps=2))
    options = SampleOptions(
        str(model_file), [0, 3], str(tmp_path / "g.png"), per_class=2, steps=2, vae=str(vae_dir),
        scale_factor=0.5, npz=str(tmp_path / "s.npz"), device="cpu",
    )  # fmt: skip
    images, _ = sample(options)
    assert images.shape == (4, 8, 8, 3)
    # the same chain by hand: latents / scale factor -> VAE decoder
    config = SamplingConfig(
        steps=2, sampler="ddpm", cfg_scale=1.5, seed=0, batch_size=64, clip_denoised=False
    )
    latents = sample_class_conditional(load_model(model_file), torch.tensor([0, 0, 3, 3]), config)
    with torch.no_grad():
        expected = to_uint8_images(vae.decode(latents / 0.5).sample)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
