"""``switchdit eval``: score a model or a set of samples.

    switchdit eval --checkpoint MODEL.safetensors --digits [--per-class 20] [--cfg-scale 1.5]
                   [--steps 50] [--sampler ddpm|ddim] [--seed S] [--json]
    switchdit eval --npz samples.npz [--ref ref.npz] --inception pt_inception-2015-12-05-6726825d.pth

The first samples the digits demo model and scores class accuracy and the Fréchet distance in
the digits classifier's feature space; the second computes Inception Score, and with a reference
FID and precision/recall, for uint8 samples stored as the ADM/DiT suites store them.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from switchdit_dist.devices import resolve_device
from switchdit_dist.errors import UserError
from switchdit_dist.eval.digits_data import DIGITS_SIZE, NUM_DIGIT_CLASSES
from switchdit_dist.sampling.generate import SAMPLERS, SamplingConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--digits", action="store_true", help="sample the digits model and score it")
    mode.add_argument("--npz", metavar="SAMPLES", help="score uint8 images [N,H,W,3] stored under arr_0")
    parser.add_argument("--checkpoint", metavar="MODEL", help="model file (.safetensors) for --digits")
    parser.add_argument("--per-class", type=int, default=20, help="samples per digit (default 20)")
    parser.add_argument(
        "--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = off)"
    )
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--noise-schedule",
        choices=("linear", "cosine"),
        default="linear",
        help="the model's training schedule (diffusion.noise_schedule)",
    )
    parser.add_argument(
        "--ref", metavar="REF", help="reference .npz: mu/sigma statistics and/or arr_0 images"
    )
    parser.add_argument("--inception", metavar="PATH", help="FID Inception weights (see docs/evaluation.md)")
    parser.add_argument("--nearest-k", type=int, default=3, help="k of the precision/recall manifolds")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _device(name: str | None) -> torch.device:
    return resolve_device(name or "auto")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{name} must be >= 1, got {value}")


def _print_table(title: str, rows: list[tuple[str, object]]) -> None:
    print(title)
    for key, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<18} {text}")


def check_digits_model(model: torch.nn.Module, path: str, cfg_scale: float) -> None:
    c = model.config
    expected = (1, DIGITS_SIZE, NUM_DIGIT_CLASSES)
    if (c.in_channels, c.input_size, c.num_classes) != expected:
        raise UserError(
            f"{path}: not a digits model: in_channels={c.in_channels}, input_size={c.input_size}, "
            f"num_classes={c.num_classes}; expected {expected[0]}, {expected[1]}, {expected[2]}"
        )
    if cfg_scale != 1.0 and c.class_dropout_prob <= 0:
        raise UserError(f"{path}: the model has no null class (class_dropout_prob=0); use --cfg-scale 1")


def run_digits(args: argparse.Namespace) -> dict:
    from switchdit_dist import load_model
    from switchdit_dist.eval.digits_metrics import DigitsEvaluator
    from switchdit_dist.sampling.generate import sample_class_conditional

    if not args.checkpoint:
        raise UserError("--digits needs --checkpoint MODEL.safetensors")
    _check_positive("--per-class", args.per_class)
    config = SamplingConfig(
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        batch_size=max(args.batch_size, 1),
        noise_schedule=args.noise_schedule,
    )
    device = _device(args.device)
    model = load_model(args.checkpoint, device=device)
    check_digits_model(model, args.checkpoint, args.cfg_scale)
    labels = torch.arange(NUM_DIGIT_CLASSES).repeat_interleave(args.per_class)
    start = time.perf_counter()
    images = sample_class_conditional(model, labels, config, device=device)
    sampling_s = time.perf_counter() - start
    scores = DigitsEvaluator().score(images, labels)
    return {
        "checkpoint": args.checkpoint,
        "sampler": config.sampler,
        "steps": config.steps,
        "cfg_scale": config.cfg_scale,
        "seed": config.seed,
        "sampling_seconds": round(sampling_s, 2),
        **scores.to_dict(),
    }


def run_npz(args: argparse.Namespace) -> dict:
    from switchdit_dist.eval.image_metrics import load_reference, load_samples, score_images
    from switchdit_dist.eval.inception import load_inception

    if not args.inception:
        raise UserError("--npz needs --inception PATH (the FID Inception weights; see docs/evaluation.md)")
    _check_positive("--batch-size", args.batch_size)
    _check_positive("--nearest-k", args.nearest_k)
    samples = load_samples(args.npz)
    reference = load_reference(args.ref) if args.ref else None
    network = load_inception(args.inception)
    scores = score_images(samples, reference, network, args.batch_size, _device(args.device), args.nearest_k)
    return {"samples": args.npz, "reference": args.ref, **scores.to_dict()}


def run(args: argparse.Namespace) -> int:
    result = run_digits(args) if args.digits else run_npz(args)
    if args.json:
        # NaN (a class without samples) is not JSON: write null.
        clean = {
            k: (
                [None if isinstance(x, float) and math.isnan(x) else x for x in v]
                if isinstance(v, list)
                else v
            )
            for k, v in result.items()
        }
        print(json.dumps(clean))
        return 0
    if args.digits:
        _print_table(
            f"digits: {result['num_samples']} samples, {result['sampler']} {result['steps']} steps, "
            f"cfg {result['cfg_scale']}, seed {result['seed']} ({result['sampling_seconds']} s)",
            [("class accuracy", result["accuracy"]), ("Fréchet distance", result["frechet_distance"])],
        )
        per_class = " ".join(f"{c}:{a:.2f}" for c, a in enumerate(result["per_class_accuracy"]))
        print(f"  per class          {per_class}")
    else:
        rows = [("Inception Score", result["inception_score"]), ("IS std", result["inception_score_std"])]
        for key, label in (("fid", "FID"), ("precision", "precision"), ("recall", "recall")):
            if result[key] is not None:
                rows.append((label, result[key]))
        _print_table(f"{result['samples']}: {result['num_samples']} samples", rows)
    return 0
