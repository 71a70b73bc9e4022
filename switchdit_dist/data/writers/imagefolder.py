"""``switchdit prepare imagefolder``: encode an ImageFolder/ImageNet-style tree with a VAE.

* Classes are the sorted names of the subfolders of ``--src`` (class index = position), images
  are every file with an image extension below them, in sorted path order.
* Each image gets ADM's centre crop (halve with a box filter while the short side is at least
  twice the target, resize the short side to the target with bicubic, crop the centre square),
  then is scaled to [-1, 1] and encoded by a diffusers ``AutoencoderKL`` loaded from a local
  folder (``from_pretrained``, no hub access).
* The stored latent is the posterior mean by default: deterministic, and what most latent
  diffusion pipelines store. ``--sample-posterior`` stores ``mean + std * noise`` instead, with
  the noise of image ``i`` drawn from seed ``seed + i`` (flipped copies get their own draw), so
  the output still does not depend on batch size or device order. Either way the latent is
  ``(z - shift_factor) * scaling_factor`` from the VAE's config (0.18215 and no shift for SD VAEs).
* ``--flip`` stores a horizontally flipped copy right after each image (key suffix ``_flip``);
  the flip is applied to the pixels before encoding.
* Shard ``i`` holds samples ``[i*S, (i+1)*S)``; a run that was interrupted keeps the finished
  shards and redoes the rest (see ``shardset.py``).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from switchdit_dist.data.writers.shardset import SampleRecord, ShardSetResult, ShardSetSpec, write_shard_set
from switchdit_dist.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageFolderOptions:
    src: str
    vae: str
    out: str
    resolution: int = 256
    flip: bool = False
    batch_size: int = 32
    workers: int = 0
    samples_per_shard: int = 1000
    dtype: str = "float16"
    sample_posterior: bool = False
    seed: int = 0
    device: str = "auto"


def list_images(src: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """(image paths relative to src, class indices, class names)."""
    root = Path(src)
    if not root.is_dir():
        raise UserError(f"--src: {src} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"--src: {src} has no class subfolders; expected SRC/<class>/<image files>")
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(
            p.relative_to(root)
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        paths.extend(found)
        labels.extend([index] * len(found))
    if not paths:
        raise UserError(f"--src: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {src}/<class>/")
    return paths, labels, classes


def center_crop(image, size: int) -> np.ndarray:
    """ADM's centre crop of a PIL image to ``size x size``; uint8 [size, size, 3]."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - size) // 2
    left = (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


def _load(job: tuple[str, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    path, size = job
    try:
        with Image.open(path) as image:
            return center_crop(image, size)
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"{path}: cannot read the image ({err})") from None


def _noise_seed(seed: int, image: int, flipped: bool) -> int:
    return int(np.random.SeedSequence([seed, image, int(flipped)]).generate_state(1)[0])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None


def load_vae(folder: str, device: torch.device):
    from switchdit_dist.extras import need

    AutoencoderKL = need("diffusers", "encoding images with a VAE (--vae)").AutoencoderKL

    if not (Path(folder) / "config.json").is_file():
        raise UserError(
            f"--vae: {folder} is not a saved AutoencoderKL (no config.json; expected the output "
            f"of save_pretrained or a downloaded VAE folder)"
        )
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        raise UserError(f"--vae: cannot load an AutoencoderKL from {folder}: {err}") from None
    return vae.to(device).eval().requires_grad_(False)


def write_imagefolder(opts: ImageFolderOptions, log=print) -> ShardSetResult:
    if opts.batch_size < 1:
        raise UserError(f"--batch-size: expected >= 1, got {opts.batch_size}")
    if opts.workers < 0:
        raise UserError(f"--workers: expected >= 0, got {opts.workers}")
    paths, labels, classes = list_images(opts.src)
    device = _device(opts.device)
    vae = load_vae(opts.vae, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if opts.resolution < 1 or opts.resolution % factor:
        raise UserError(
            f"--resolution: expected a multiple of the VAE's downsampling factor {factor} "
            f"(256 or 512 for ImageNet), got {opts.resolution}"
        )
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    side = opts.resolution // factor
    copies = 2 if opts.flip else 1
    root = Path(opts.src)
    spec = ShardSetSpec(
        total=len(paths) * copies,
        samples_per_shard=opts.samples_per_shard,
        latent_shape=(int(vae.config.latent_channels), side, side),
        latent_dtype=opts.dtype,
        num_classes=len(classes),
        scale_factor=scale,
        vae=Path(opts.vae).resolve().name,
        class_names=classes,
        source={
            "kind": "imagefolder",
            "images": len(paths),
            "resolution": opts.resolution,
            "flip": opts.flip,
            "latent": "sample" if opts.sample_posterior else "mean",
            "seed": opts.seed,
            "shift_factor": shift,
        },
    )

    pool = mp.get_context("fork").Pool(opts.workers) if opts.workers > 0 else None

    def images(indices: list[int]) -> Iterator[np.ndarray]:
        jobs = [(str(root / paths[i]), opts.resolution) for i in indices]
        return pool.imap(_load, jobs, chunksize=4) if pool is not None else map(_load, jobs)

    @torch.no_grad()
    def encode(pixels: list[np.ndarray], noise_seeds: list[int]) -> np.ndarray:
        x = torch.from_numpy(np.stack(pixels)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        posterior = vae.encode(x).latent_dist
        z = posterior.mean
        if opts.sample_posterior:
            noise = torch.stack(
                [torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(s)) for s in noise_seeds]
            ).to(device)
            z = z + posterior.std * noise
        return ((z - shift) * scale).float().cpu().numpy()

    def produce(start: int, stop: int) -> Iterator[SampleRecord]:
        entries = [(n // copies, n % copies == 1) for n in range(start, stop)]
        unique = sorted({i for i, _ in entries})
        stream = zip(unique, images(unique))  # decoded ahead by the pool, consumed in order
        loaded: dict[int, np.ndarray] = {}
        for first in range(0, len(entries), opts.batch_size):
            chunk = entries[first : first + opts.batch_size]
            while chunk[-1][0] not in loaded:
                index, pixels = next(stream)
                loaded[index] = pixels
            pixels = [loaded[i][:, ::-1] if flipped else loaded[i] for i, flipped in chunk]
            seeds = [_noise_seed(opts.seed, i, flipped) for i, flipped in chunk]
            latents = encode([np.ascontiguousarray(p) for p in pixels], seeds)
            for (i, flipped), latent in zip(chunk, latents):
                key = f"{i:08d}_flip" if flipped else f"{i:08d}"
                yield key, latent, labels[i], {"path": paths[i].as_posix(), "flip": flipped}
            keep = chunk[-1][0]  # a flipped copy may still need the last image
            loaded = {i: p for i, p in loaded.items() if i >= keep}

    try:
        log(
            f"{len(paths)} images in {len(classes)} classes -> {spec.total} samples, "
            f"latents {list(spec.latent_shape)} on {device}"
        )
        return write_shard_set(opts.out, spec, produce, log=log)
    finally:
        if pool is not None:
            pool.terminate()
