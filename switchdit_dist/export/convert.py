"""``switchdit convert CKPT OUT.safetensors``: a training checkpoint -> one model file.

CKPT is a run directory (its newest complete checkpoint is used) or one checkpoint directory
``RUN/checkpoints/step_XXXXXXXX``, written by any number of processes, any expert-parallel size and
ZeRO stage (the format is ``switchdit_dist.checkpoint``). ``--weights ema`` (default) takes the EMA
entries, ``--weights model`` the fp32 master weights; both are keyed by the single-device model's
names already.

Everything is checked before anything is written: the checkpoint is complete, every file matches
the manifest's size and checksum, and the tensors match the model config of ``meta.json`` key by
key and shape by shape. The output is written under a temporary name and renamed into place.
Reading needs torch only: DeepSpeed need not be installed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from switchdit_dist.errors import UserError

WEIGHT_CHOICES = ("ema", "model")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ConvertOptions:
    checkpoint: str
    out: str
    weights: str = "ema"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_CHOICES:
            raise UserError(f"--weights must be one of {WEIGHT_CHOICES}, got {self.weights!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run directory (newest complete checkpoint) or a step_* directory")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument(
        "--weights", choices=WEIGHT_CHOICES, default="ema", help="EMA (default) or raw weights"
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="stored dtype (default fp32)")


def run(args: argparse.Namespace) -> int:
    options = ConvertOptions(args.checkpoint, args.out, args.weights, args.dtype)
    path, step = convert(options)
    print(f"wrote {options.out}: {options.weights} weights of step {step} from {path}")
    return 0


# --- locating and checking the checkpoint ---------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint named by ``path``: a run directory or its checkpoints/ folder (the newest
    complete checkpoint), or one checkpoint directory."""
    from switchdit_dist.checkpoint.store import find_resume_point, is_complete

    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"{path}: no such directory (expected a run directory or a checkpoints/step_* directory)"
        )
    # a run directory, or its checkpoints/ folder
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if folder is not path or any(folder.glob("step_*/")):
        found = find_resume_point(folder)
        if found is None:
            raise UserError(f"{path}: no complete checkpoint under {folder}")
        return found
    if not (path / "meta.json").is_file() and not path.name.startswith("step_"):
        raise UserError(
            f"{path}: neither a run directory (with checkpoints/) nor a checkpoint directory (with meta.json)"
        )
    if not is_complete(path):
        raise UserError(
            f"{path}: incomplete checkpoint (no COMPLETE marker: its writing was interrupted); "
            "convert a complete one, e.g. the run directory's newest"
        )
    return path


def read_meta(path: Path):
    """The checkpoint's header (``meta.json``), after checking every file against the manifest."""
    from switchdit_dist.checkpoint import store
    from switchdit_dist.checkpoint.manifest import Manifest
    from switchdit_dist.checkpoint.schema import CheckpointMeta

    meta = CheckpointMeta.read(path)
    store.verify_or_raise(path, full=True)
    written = Manifest.read(path).step
    if written != meta.step:
        raise UserError(
            f"checkpoint {path} mixes files from different steps: meta.json says step {meta.step}, "
            f"manifest.json step {written}"
        )
    return meta


def model_config_of(meta, source: Path):
    from switchdit_dist.config import ModelSection

    try:
        return ModelSection(**meta.model).build_config()
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{source / 'meta.json'}: invalid model section ({err})") from None


def diffusion_settings(path: Path) -> dict[str, Any] | None:
    """The diffusion section the checkpoint was trained with, if its run recorded one: from the
    run's config history (``train/resume_config.py``), not a config.yaml rewritten by a later start
    (a resume may not change it anyway); for runs older than the history, from config.yaml."""
    from switchdit_dist.train.checkpoint import step_of
    from switchdit_dist.train.resume_config import trained_with

    if path.parent.name != "checkpoints":
        return None
    try:
        step = step_of(path.name)
    except ValueError:
        return None
    section = (trained_with(path.parent.parent, step) or {}).get("diffusion")
    return section if isinstance(section, dict) else None


def convert(options: ConvertOptions) -> tuple[Path, int]:
    """Check and merge the checkpoint, write ``options.out``; returns (checkpoint dir, step)."""
    from switchdit_dist.checkpoint import store
    from switchdit_dist.export.load import check_state_dict, save_model_file
    from switchdit_dist.models.registry import build_model

    out = Path(options.out)
    if not out.parent.is_dir():
        raise UserError(f"{out}: the output folder {out.parent} does not exist")
    path = resolve_checkpoint(options.checkpoint)
    meta = read_meta(path)
    config = model_config_of(meta, path)
    with torch.device("meta"):
        reference = build_model(config)
    shapes = {name: p.shape for name, p in reference.named_parameters()}
    state = store.read_weights(path, options.weights, shapes)
    check_state_dict(reference, state, source=f"checkpoint {path} ({options.weights} weights)")
    dtype = DTYPES[options.dtype]
    state = {k: v.to(dtype) for k, v in state.items()}
    extra = {"step": meta.step, "weights": options.weights, "source_checkpoint": str(path.resolve())}
    diffusion = diffusion_settings(path)
    if diffusion is not None:
        extra["diffusion"] = diffusion
    save_model_file(out, state, config, extra)
    return path, meta.step
