"""Writers behind `switchdit prepare`: digits, ImageFolder + VAE (resumable), npy folders, and
manifests for shards written by webdataset's own ShardWriter."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from switchdit_dist.cli import main as cli_main
from switchdit_dist.data.config import DataConfig, resolve_shards
from switchdit_dist.data.loader import LatentLoader
from switchdit_dist.data.tario import SampleDecoder, iter_raw_samples


def read_all(folder):
    """Every sample of a shard set, via the manifest: {key: (latent, cls, meta)}."""
    shards = resolve_shards(str(folder))
    m = shards.manifest
    decode = SampleDecoder(m.latent_shape, m.latent_dtype, m.num_classes)
    out = {}
    for url in shards.urls:
        for raw in iter_raw_samples(url):
            key, latent, cls = decode(raw, url)
            meta = json.loads(raw["json"]) if "json" in raw else None
            out[key] = (latent, cls, meta)
    return m, out


# --- digits ----------------------------------------------------------------------------------------


def test_digits_writer(tmp_path):
    from sklearn.datasets import load_digits

    assert cli_main(["prepare", "digits", "--out", str(tmp_path / "a"), "--val-fraction", "0.1"]) == 0
    train_manifest, train = read_all(tmp_path / "a")
    val_manifest, val = read_all(tmp_path / "a" / "val")
    assert len(train) + len(val) == 1797 and len(val) == 180 and not set(train) & set(val)
    assert train_manifest.latent_shape == (1, 16, 16) and train_manifest.latent_dtype == "float32"
    assert (
        train_manifest.num_classes == 10
        and train_manifest.vae == "none"
        and train_manifest.scale_factor == 1.0
    )
    target = load_digits().target
    latents = np.stack([v[0] for v in {**train, **val}.values()])
    assert latents.min() == -1.0 and latents.max() == 1.0
    for key, (_, cls, _) in {**train, **val}.items():
        assert cls == target[int(key.split("_")[1])]
    # the same bytes on a second run
    cli_main(["prepare", "digits", "--out", str(tmp_path / "b"), "--val-fraction", "0.1"])
    for name in sorted(os.listdir(tmp_path / "a")):
        if name.endswith(".tar"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # readable by webdataset itself and by plain tar
    ds = wds.WebDataset(str(tmp_path / "a" / "train-000000.tar"), shardshuffle=False).decode()
    first = next(iter(ds))
    assert first["latent.npy"].shape == (1, 16, 16) and first["cls"] == target[int(first["__key__"][7:])]
    listing = subprocess.run(
        ["tar", "tf", str(tmp_path / "a" / "train-000000.tar")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing[:2] == ["digits_0000.cls", "digits_0000.latent.npy"]


# --- shards from webdataset's ShardWriter ----------------------------------------------------------


def test_shardwriter_shards_load_after_prepare_manifest(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    with wds.ShardWriter(str(tmp_path / "part-%04d.tar"), maxcount=7, verbose=0) as sink:
        for i in range(20):
            latent = rng.standard_normal((4, 4, 4)).astype(np.float16)
            expected[f"k{i:03d}"] = (latent, i % 3)
            sink.write({"__key__": f"k{i:03d}", "latent.npy": latent, "cls": i % 3, "json": {"i": i}})
    assert cli_main(["prepare", "manifest", "--shards", str(tmp_path), "--vae", "test"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [7, 7, 6] and manifest["num_classes"] == 3
    loader = LatentLoader(
        DataConfig(shards=str(tmp_path / "part-{0000..0002}.tar")), batch_size=5, rank=0, world_size=1
    )
    batches = [b for b, _ in zip(loader, range(4))]
    seen = {k: (b.latent[i], int(b.cls[i])) for b in batches for i, k in enumerate(b.keys)}
    assert set(seen) == set(expected)
    for key, (latent, cls) in expected.items():
        assert torch.equal(seen[key][0], torch.from_numpy(latent.astype(np.float32))) and seen[key][1] == cls


# --- ImageFolder + VAE -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder, vae.eval()


def make_image_folder(root):
    rng = np.random.default_rng(0)
    sizes = [(16, 16), (40, 24), (23, 57), (64, 64), (16, 30), (33, 17), (16, 16)]
    for i, (w, h) in enumerate(sizes):
        folder = root / ["cat", "dog", "emu"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mode_image = Image.fromarray(pixels) if i != 4 else Image.fromarray(pixels[..., 0], mode="L")
        mode_image.save(folder / f"img{i}.png" if i % 2 else folder / f"img{i}.jpg", quality=95)
    (root / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder_writer_encodes_and_resumes(tmp_path, tiny_vae):
    vae_dir, vae = tiny_vae
    src, out = tmp_path / "images", tmp_path / "shards"
    make_image_folder(src)
    args = [
        "prepare",
        "imagefolder",
        "--src",
        str(src),
        "--vae",
        str(vae_dir),
        "--out",
        str(out),
        "--resolution",
        "16",
        "--flip",
        "--samples-per-shard",
        "4",
        "--batch-size",
        "3",
        "--dtype",
        "float32",
    ]
    assert cli_main(args) == 0
    manifest, samples = read_all(out)
    assert manifest.total_samples == 14 and len(manifest.shards) == 4
    assert manifest.latent_shape == (4, 16, 16) and manifest.class_names == ["cat", "dog", "emu"]
    assert manifest.scale_factor == pytest.approx(0.18215)
    # a 16x16 image is not resized by the centre crop: compare with the VAE applied directly
    key = next(
        k for k, (_, _, meta) in samples.items() if meta["path"] == "cat/img0.jpg" and not meta["flip"]
    )
    pixels = np.asarray(Image.open(src / "cat" / "img0.jpg").convert("RGB"))
    for flipped, sample_key in ((False, key), (True, key + "_flip")):
        image = pixels[:, ::-1] if flipped else pixels
        x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            reference = vae.encode(x).latent_dist.mean[0] * 0.18215
        torch.testing.assert_close(
            torch.from_numpy(samples[sample_key][0].copy()), reference, rtol=1e-4, atol=1e-5
        )
        assert samples[sample_key][1] == 0

    # interrupt: one finished shard gone, a partial file left behind; the rerun redoes only that one
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    (out / "train-000002.tar").unlink()
    (out / "train-000002.tar.partial").write_bytes(b"half a shard")
    log = []
    from switchdit_dist.data.writers.imagefolder import ImageFolderOptions, write_imagefolder

    write_imagefolder(
        ImageFolderOptions(
            src=str(src),
            vae=str(vae_dir),
            out=str(out),
            resolution=16,
            flip=True,
            batch_size=3,
            workers=2,
            samples_per_shard=4,
            dtype="float32",
        ),
        log=log.append,
    )
    assert [line.split()[0] for line in log[1:5]] == ["kept", "kept", "wrote", "kept"]
    for name, (mtime, data) in before.items():
        path = out / name
        assert path.read_bytes() == data  # same content, also when decoded by workers
        if name != "train-000002.tar":
            assert path.stat().st_mtime_ns == mtime  # untouched
    assert not list(out.glob("*.partial"))

    # a seeded posterior sample instead of the mean: reproducible, and not the mean
    sampled = []
    for run in ("s1", "s2"):
        write_imagefolder(
            ImageFolderOptions(
                src=str(src),
                vae=str(vae_dir),
                out=str(tmp_path / run),
                resolution=16,
                sample_posterior=True,
                seed=7,
                samples_per_shard=4,
                dtype="float32",
            ),
            log=log.append,
        )
        sampled.append(read_all(tmp_path / run)[1])
    for key, (latent, cls, _) in sampled[0].items():
        np.testing.assert_array_equal(latent, sampled[1][key][0])
        assert cls == samples[key][1] and not np.allclose(latent, samples[key][0], atol=1e-3)

    # a run with other settings refuses to mix its shards with these
    with pytest.raises(Exception, match="prepared with different settings"):
        write_imagefolder(
            ImageFolderOptions(src=str(src), vae=str(vae_dir), out=str(out), resolution=16), log=log.append
        )


def test_imagefolder_bad_input(tmp_path, tiny_vae):
    vae_dir, _ = tiny_vae
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "broken.png").write_bytes(b"not a png")
    base = [
        "prepare",
        "imagefolder",
        "--vae",
        str(vae_dir),
        "--out",
        str(tmp_path / "o"),
        "--resolution",
        "16",
    ]
    assert cli_main(base + ["--src", str(tmp_path / "src")]) == 2  # reported as a user error
    assert cli_main(base + ["--src", str(tmp_path / "missing")]) == 2
    from switchdit_dist.data.writers.imagefolder import ImageFolderOptions, write_imagefolder
    from switchdit_dist.errors import UserError

    with pytest.raises(UserError, match=r"broken\.png: cannot read the image"):
        write_imagefolder(
            ImageFolderOptions(
                src=str(tmp_path / "src"), vae=str(vae_dir), out=str(tmp_path / "p"), resolution=16
            ),
            log=lambda s: None,
        )
    with pytest.raises(UserError, match=r"--vae: .* is not a saved AutoencoderKL"):
        write_imagefolder(
            ImageFolderOptions(src=str(tmp_path / "src"), vae=str(tmp_path), out=str(tmp_path / "p")),
            log=lambda s: None,
        )


# --- npy folders -----------------------------------------------------------------------------------


def test_npy_writer_subfolders_and_sidecars(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "cat/a.npy": rng.standard_normal((4, 2, 2)).astype(np.float32),
        "cat/b.npy": rng.standard_normal((3, 4, 2, 2)).astype(np.float32),
        "dog/c.npy": rng.standard_normal((1, 4, 2, 2)).astype(np.float32),
    }
    for rel, array in arrays.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "src" / rel, array)
    cli_main(
        [
            "prepare",
            "npy",
            "--src",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "o1"),
            "--samples-per-shard",
            "2",
            "--scale-factor",
            "0.18215",
            "--vae",
            "sd-vae-ft-ema",
        ]
    )
    manifest, samples = read_all(tmp_path / "o1")
    assert (
        manifest.total_samples == 5 and manifest.class_names == ["cat", "dog"] and len(manifest.shards) == 3
    )
    assert manifest.scale_factor == 0.18215 and manifest.vae == "sd-vae-ft-ema"
    rows = [(rel, r) for rel, a in arrays.items() for r in range(a.shape[0] if a.ndim == 4 else 1)]
    for n, (rel, r) in enumerate(rows):
        latent, cls, meta = samples[f"{n:08d}"]
        array = arrays[rel]
        np.testing.assert_array_equal(latent, array[r] if array.ndim == 4 else array)
        assert cls == (0 if rel.startswith("cat") else 1) and meta == {"file": rel, "row": r}

    # fast-DiT layout: features and labels in parallel folders; and a JSON sidecar
    flat = tmp_path / "features"
    flat.mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(3):
        np.save(flat / f"{i}.npy", rng.standard_normal((1, 4, 2, 2)).astype(np.float16))
        np.save(tmp_path / "labels" / f"{i}.npy", np.array([7 * i]))
    cli_main(
        [
            "prepare",
            "npy",
            "--src",
            str(flat),
            "--labels",
            str(tmp_path / "labels"),
            "--out",
            str(tmp_path / "o2"),
            "--num-classes",
            "20",
        ]
    )
    manifest, samples = read_all(tmp_path / "o2")
    assert manifest.latent_dtype == "float16" and manifest.num_classes == 20
    assert sorted(cls for _, cls, _ in samples.values()) == [0, 7, 14]
    (tmp_path / "labels.json").write_text(json.dumps({"0.npy": 1, "1.npy": [2], "2.npy": 3}))
    cli_main(
        [
            "prepare",
            "npy",
            "--src",
            str(flat),
            "--labels",
            str(tmp_path / "labels.json"),
            "--out",
            str(tmp_path / "o3"),
            "--dtype",
            "float32",
        ]
    )
    manifest, samples = read_all(tmp_path / "o3")
    assert manifest.latent_dtype == "float32" and manifest.num_classes == 4
    assert [samples[f"{i:08d}"][1] for i in range(3)] == [1, 2, 3]

    # bad input: a label missing, and a file without a class folder
    (tmp_path / "labels" / "2.npy").unlink()
    assert (
        cli_main(
            [
                "prepare",
                "npy",
                "--src",
                str(flat),
                "--labels",
                str(tmp_path / "labels"),
                "--out",
                str(tmp_path / "o4"),
            ]
        )
        == 2
    )
    shutil.copy(flat / "0.npy", tmp_path / "src" / "loose.npy")
    assert cli_main(["prepare", "npy", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o5")]) == 2
