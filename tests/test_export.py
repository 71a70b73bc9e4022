"""``switchdit convert`` on a real 2-process (EP 2, ZeRO-2) checkpoint, its refusals of bad
checkpoints (each leaves nothing behind), ``switchdit sample`` from the converted file, and neither
of them (nor ``load_model``) importing DeepSpeed."""

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

from switchdit_dist.checkpoint import dcp_io, store
from switchdit_dist.checkpoint.manifest import Manifest, describe
from switchdit_dist.errors import UserError
from switchdit_dist.export.convert import ConvertOptions, convert

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
    # the EMA entries of both expert-parallel ranks, under global names already
    expected = entries(step_dir(run, 2), "ema")
    assert merged.keys() == expected.keys()
    assert {f"blocks.{b}.moe.experts.{e}.weight" for b in range(4) for e in range(4)} <= merged.keys()
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key


def entries(ckpt: Path, kind: str) -> dict[str, torch.Tensor]:
    """The checkpoint's ``kind`` (model, ema) entries by parameter name, read in one process."""
    keys = [k for k in dcp_io.tensor_index(ckpt) if k.startswith(f"{kind}/")]
    return {k[len(kind) + 1 :]: v for k, v in store.read_entries(ckpt, keys).items()}


def test_model_weights_are_the_fp32_masters_cast_to_bf16(run, tmp_path):
    out = tmp_path / "model.safetensors"
    convert(ConvertOptions(str(step_dir(run, 1)), str(out), weights="model", dtype="bf16"))
    merged = load_file(str(out))
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    masters = entries(step_dir(run, 1), "model")  # flat, as ZeRO partitions them
    assert merged.keys() == masters.keys() and "blocks.2.moe.experts.3.weight" in merged
    for key, value in masters.items():
        assert torch.equal(merged[key].flatten(), value.to(torch.bfloat16)), key


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


def test_missing_data_file_is_refused(run, tmp_path):
    ckpt = copy_step(run, 2, tmp_path)
    (ckpt / "__1_0.distcp").unlink()
    refused(ckpt, tmp_path, r"is damaged: __1_0\.distcp: missing", weights="model")


def test_truncated_data_file_is_refused(run, tmp_path):
    ckpt = copy_step(run, 2, tmp_path)
    os.truncate(ckpt / "__0_0.distcp", 100)
    refused(ckpt, tmp_path, r"is damaged: __0_0\.distcp: truncated: 100 bytes")


@pytest.mark.parametrize("file", [".metadata", "__0_0.distcp", "meta.json"])
def test_file_from_another_step_is_refused(run, tmp_path, file):
    ckpt = copy_step(run, 2, tmp_path)
    shutil.copy(step_dir(run, 1) / file, ckpt / file)
    refused(
        ckpt, tmp_path, rf"is damaged: {re.escape(file)}: (checksum mismatch|truncated|longer than written)"
    )


def rewrite_meta(ckpt: Path, change) -> None:
    """Edit meta.json and record the edit in the manifest, as a consistent (but wrong) header."""
    meta = json.loads((ckpt / "meta.json").read_text())
    change(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    manifest = Manifest.read(ckpt)
    manifest.files["meta.json"] = describe(ckpt / "meta.json")
    manifest.write(ckpt)


def test_header_of_another_step_is_refused(run, tmp_path):
    ckpt = copy_step(run, 2, tmp_path)
    rewrite_meta(ckpt, lambda meta: meta.update(step=1))
    refused(
        ckpt, tmp_path, r"mixes files from different steps: meta\.json says step 1, manifest\.json step 2"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": "S"}, r"tensors do not match the model config; missing: .*wrong shape: .*\(config expects"),
        ({"top_k": 5}, r"invalid model section"),
        (
            {"num_experts": 2},
            r"tensors do not match the model config; unexpected: blocks\.0\.moe\.experts\.2\.",
        ),
    ],
)
def test_files_of_another_model_are_refused(run, tmp_path, change, message):
    """meta.json describing another model than the one whose tensors are in the folder."""
    ckpt = copy_step(run, 2, tmp_path)
    rewrite_meta(ckpt, lambda meta: meta["model"].update(change))
    refused(ckpt, tmp_path, message, weights="model" if "num_experts" in change else "ema")


def test_unreadable_meta_and_missing_output_folder_are_refused(run, tmp_path):
    ckpt = copy_step(run, 2, tmp_path)
    (ckpt / "meta.json").write_text("{not json")
    refused(ckpt, tmp_path, r"meta\.json: not valid JSON")
    (ckpt / "meta.json").unlink()
    (tmp_path / "again").mkdir()
    refused(ckpt, tmp_path / "again", r"meta\.json is missing")
    with pytest.raises(UserError, match=r"the output folder .*missing does not exist"):
        convert(ConvertOptions(str(run), str(tmp_path / "missing" / "m.safetensors")))


def test_convert_command_prints_the_refusal_without_traceback(tmp_path):
    proc = cli("convert", str(tmp_path / "nope"), str(tmp_path / "m.safetensors"))
    assert proc.returncode == 2
    assert "switchdit convert: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_convert_load_model_and_sample_do_not_import_deepspeed(run, tmp_path):
    """An inference machine need not have DeepSpeed: the three run in a fresh interpreter and
    DeepSpeed is not among its modules afterwards."""
    script = f"""
import sys
from switchdit_dist import cli
from switchdit_dist.export.load import load_model
out = {str(tmp_path / "m.safetensors")!r}
assert cli.main(["convert", {str(run)!r}, out]) == 0
load_model(out)
assert cli.main(["sample", "--checkpoint", out, "--classes", "1", "--per-class", "1", "--steps", "2",
                 "--device", "cpu", "--out", {str(tmp_path / "g.png")!r}]) == 0
print("DEEPSPEED_MODULES", sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed"))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEEPSPEED_MODULES []" in proc.stdout


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
    from switchdit_dist.sampling.command import SampleOptions, sample

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
    from switchdit_dist.export.load import load_model
    from switchdit_dist.sampling.command import SampleOptions, sample, to_uint8_images
    from switchdit_dist.sampling.generate import SamplingConfig, sample_class_conditional

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
