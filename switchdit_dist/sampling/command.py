"""``switchdit sample``: an image grid (and an ``.npz``) from a model file, on one GPU or the CPU.

No process group is involved: the model file (``switchdit convert`` / ``switchdit import``) holds
the whole single-device model. The reverse chain is the evaluation sampler
(``switchdit_dist.sampling.generate.sample_class_conditional``: DDPM respaced to ``--steps`` or DDIM,
classifier-free guidance on every latent channel), so ``switchdit eval`` and this command draw the
same images for the same settings.

Latent models (4 channels) are decoded by a diffusers ``AutoencoderKL`` from a local folder
(``--vae``), after dividing by the latent scale factor; other models (the digits demo's 1-channel
pixel "latents" in [-1, 1]) are shown as they are. The diffusion schedule defaults to the one the
model was trained with when the file records it (``switchdit convert`` of a run does), else linear.

Outputs: a PNG grid with one row per class, and optionally ``.npz`` with ``arr_0`` = uint8
``[N, H, W, 3]`` (the ADM / DiT evaluation convention) and ``labels`` = ``[N]``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from switchdit_dist.devices import resolve_device
from switchdit_dist.errors import UserError

SAMPLERS = ("ddpm", "ddim")
LATENT_CHANNELS = 4
DEFAULT_SCALE_FACTOR = 0.18215


@dataclass
class SampleOptions:
    checkpoint: str
    classes: list[int]
    out: str
    per_class: int = 8
    cfg_scale: float = 1.5
    steps: int = 250
    sampler: str = "ddpm"
    noise_schedule: str | None = None  # None: the file's training schedule, else linear
    vae: str | None = None
    scale_factor: float = DEFAULT_SCALE_FACTOR
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64
    npz: str | None = None

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise UserError(f"--per-class must be >= 1, got {self.per_class}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.scale_factor <= 0:
            raise UserError(f"--scale-factor must be > 0, got {self.scale_factor}")
        for name, path in (("--out", self.out), ("--npz", self.npz)):
            if path is not None and not Path(path).parent.is_dir():
                raise UserError(f"{name} {path}: the folder {Path(path).parent} does not exist")


def parse_classes(text: str) -> list[int]:
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--classes: expected comma-separated class ids such as 0,1,2, got {text!r}"
        ) from None
    if not classes:
        raise UserError("--classes: expected at least one class id, e.g. --classes 0,1,2")
    return classes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="model file (.safetensors from convert or import)"
    )
    parser.add_argument("--classes", required=True, help="comma-separated class ids, one grid row each")
    parser.add_argument(
        "--per-class", type=int, default=8, help="samples per class (grid columns, default 8)"
    )
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance (1 = off)")
    parser.add_argument("--steps", type=int, default=250, help="sampling steps (default 250)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="ddpm (default) or ddim")
    parser.add_argument(
        "--noise-schedule",
        default=None,
        help="linear or cosine (default: the schedule recorded in the model file, else linear)",
    )
    parser.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (latent models)")
    parser.add_argument(
        "--scale-factor",
        type=float,
        default=DEFAULT_SCALE_FACTOR,
        help=f"latent scale factor the VAE latents were multiplied by (default {DEFAULT_SCALE_FACTOR})",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default 64)")
    parser.add_argument("--out", required=True, help="PNG grid, one row per class")
    parser.add_argument(
        "--npz", default=None, help="also write uint8 samples [N,H,W,3] as arr_0, plus labels"
    )


def run(args: argparse.Namespace) -> int:
    options = SampleOptions(
        checkpoint=args.checkpoint,
        classes=parse_classes(args.classes),
        out=args.out,
        per_class=args.per_class,
        cfg_scale=args.cfg_scale,
        steps=args.steps,
        sampler=args.sampler,
        noise_schedule=args.noise_schedule,
        vae=args.vae,
        scale_factor=args.scale_factor,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        npz=args.npz,
    )
    images, labels = sample(options)
    print(
        f"wrote {options.out} ({len(options.classes)} rows x {options.per_class})"
        + (f" and {options.npz} ({len(labels)} samples)" if options.npz else "")
    )
    return 0


# --- the pieces -------------------------------------------------------------------------------------


def recorded_diffusion(path: str) -> dict:
    """The training diffusion settings stored in the model file by ``switchdit convert``, if any."""
    from switchdit_dist.export.load import read_model_metadata

    _, metadata = read_model_metadata(path)
    try:
        value = json.loads(metadata.get("diffusion", "null"))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def to_uint8_images(pixels: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] (C = 1 or 3) -> uint8 [N, H, W, 3]."""
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    if pixels.shape[1] != 3:
        raise UserError(
            f"samples have {pixels.shape[1]} channels: only 1- or 3-channel pixel models are shown "
            "directly; latent models need --vae"
        )
    scaled = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """uint8 [rows*cols, H, W, 3] (row-major) -> one [rows*(H+2)+2, cols*(W+2)+2, 3] image."""
    n, h, w, _ = images.shape
    cols = n // rows
    pad = 2
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae_dir: str, scale_factor: float, device, batch_size: int):
    from switchdit_dist.data.writers.imagefolder import load_vae

    vae = load_vae(vae_dir, device)
    if int(vae.config.latent_channels) != latents.shape[1]:
        raise UserError(
            f"--vae {vae_dir}: the VAE has {vae.config.latent_channels} latent channels, the model "
            f"{latents.shape[1]}"
        )
    pieces = [
        vae.decode(chunk.to(device) / scale_factor).sample.float().cpu()
        for chunk in latents.split(batch_size)
    ]
    return torch.cat(pieces)


def sample(options: SampleOptions) -> tuple[np.ndarray, np.ndarray]:
    """Sample, decode, write the grid (and .npz); returns (uint8 images [N,H,W,3], labels [N])."""
    from PIL import Image

    from switchdit_dist.diffusion import NOISE_SCHEDULES
    from switchdit_dist.export.load import load_model
    from switchdit_dist.sampling.generate import SamplingConfig, sample_class_conditional

    device = resolve_device(options.device)
    model = load_model(options.checkpoint, device=device)
    config = model.config
    bad = [c for c in options.classes if not 0 <= c < config.num_classes]
    if bad:
        raise UserError(f"--classes {bad}: the model has classes 0..{config.num_classes - 1}")
    if options.cfg_scale != 1.0 and config.class_dropout_prob <= 0:
        raise UserError(
            f"{options.checkpoint}: the model was trained without a null class (class_dropout_prob=0); "
            "use --cfg-scale 1"
        )
    latent = config.in_channels == LATENT_CHANNELS
    if latent and options.vae is None:
        raise UserError(
            f"{options.checkpoint} is a latent model ({config.in_channels} channels): pass --vae with "
            "a local AutoencoderKL folder to decode its samples"
        )
    trained = recorded_diffusion(options.checkpoint)
    schedule = options.noise_schedule or trained.get("noise_schedule", "linear")
    if schedule not in NOISE_SCHEDULES:
        raise UserError(f"--noise-schedule: expected one of {sorted(NOISE_SCHEDULES)}, got {schedule!r}")
    sampling = SamplingConfig(
        steps=options.steps,
        sampler=options.sampler,
        cfg_scale=options.cfg_scale,
        seed=options.seed,
        batch_size=options.batch_size,
        num_timesteps=int(trained.get("num_timesteps", 1000)),
        noise_schedule=schedule,
        # pixel models predict x_0 in [-1, 1]; latents have no such range
        clip_denoised=not latent and options.vae is None,
    )
    labels = torch.tensor(options.classes).repeat_interleave(options.per_class)
    samples = sample_class_conditional(model, labels, sampling, device=device)
    if options.vae is not None:
        samples = decode_latents(samples, options.vae, options.scale_factor, device, options.batch_size)
    images = to_uint8_images(samples)
    Image.fromarray(image_grid(images, rows=len(options.classes))).save(options.out)
    label_array = labels.numpy().astype(np.int64)
    if options.npz:
        np.savez(options.npz, arr_0=images, labels=label_array)
    return images, label_array
