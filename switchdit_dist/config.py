"""Typed run configuration: dataclass sections loaded from YAML, with dotted ``key=value`` overrides.

Every check that can be made before a process group starts is made here, so that a bad key, a
wrong type or an impossible parallel layout fails in one clear line instead of deep inside a
collective. Sections: model, diffusion, data, parallel, optim, train, checkpoint, logging.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from switchdit_dist.data.config import DataConfig
from switchdit_dist.errors import UserError
from switchdit_dist.expert_comm import check_expert_comm
from switchdit_dist.models.dit import DiTConfig
from switchdit_dist.models.experts import EXPERT_KINDS
from switchdit_dist.models.registry import ARCHS, PATCH_SIZES, SIZES, is_moe_arch, model_config
from switchdit_dist.parallel_dims import ParallelDims
from switchdit_dist.sample_placement import PLACEMENTS


@dataclass
class ModelSection:
    arch: str = "switch-dit"  # "dit" or "switch-dit"
    size: str = "S"  # tiny, S, B, L, XL
    patch_size: int = 2
    input_size: int = 32  # latent side
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    num_experts: int = 3
    top_k: int = 2
    expert_kind: str = "linear"
    expert_mlp_ratio: float = 4.0
    prior_loss_weight: float = 1.0

    def build_config(self) -> DiTConfig:
        common = dict(
            input_size=self.input_size,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            class_dropout_prob=self.class_dropout_prob,
            learn_sigma=self.learn_sigma,
        )
        if self.arch == "switch-dit":
            common.update(
                num_experts=self.num_experts,
                top_k=self.top_k,
                expert_kind=self.expert_kind,
                expert_mlp_ratio=self.expert_mlp_ratio,
                prior_loss_weight=self.prior_loss_weight,
            )
        return model_config(self.arch, self.size, self.patch_size, **common)

    @property
    def is_moe(self) -> bool:
        return is_moe_arch(self.arch)


@dataclass
class DiffusionSection:
    num_timesteps: int = 1000
    noise_schedule: str = "linear"  # linear or cosine


@dataclass
class ParallelSection:
    ep_size: int = 1  # expert-parallel group size; groups are consecutive ranks (inside a node)
    # how samples meet experts: tokens (all-to-all of the routed tokens), weights (all-gather of the
    # linear experts, mixed per sample), auto (weights for linear experts when no more bytes)
    expert_comm: str = "auto"
    # which rank trains which of the global batch's timesteps: random (each slot its own draw) or
    # route_aware (the same timesteps dealt to the ranks of their experts; sample_placement.py)
    placement: str = "random"
    zero_stage: int = 2  # 0, 1 or 2
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU), gloo, nccl
    timeout_s: int = 600  # collective timeout: a dead peer ends the job instead of hanging it


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0, then constant
    grad_clip: float = 0.0  # 0 disables clipping (the paper uses none)


@dataclass
class TrainSection:
    steps: int = 400_000  # optimizer steps
    global_batch: int = 256
    micro_batch: int = 32  # per rank and forward pass; accumulation makes up the rest
    seed: int = 0
    ema_decay: float = 0.9999
    max_consecutive_nonfinite: int = 10  # skipped (NaN/Inf) steps in a row before the run stops
    compile: bool = False  # torch.compile each block's attention + MLP (the MoE layer stays eager)


@dataclass
class CheckpointSection:
    every: int = 5000  # steps; 0 = only at the end and on signals
    keep: int = 3  # complete checkpoints kept
    on_write_error: str = "stop"  # stop, or retry at the next interval
    verify: str = "size"  # at resume: size (every file's size) or full (sizes and checksums)
    fallback: str = "previous"  # damaged checkpoint at resume: previous (the newest intact one) or none
    async_: bool = False  # key `async`: write in the background, training continues


@dataclass
class LoggingSection:
    every: int = 10  # steps between metrics.jsonl lines / TensorBoard scalars
    gate_image_every: int = 1000  # steps between gate-probability images (0 = never)
    val_every: int = 0  # steps between validation losses on data.validation_shards (0 = never)
    val_batches: int = 8  # micro-batches per rank in the fixed validation set
    record_keys: bool = False  # every rank writes the sample keys of each micro-batch to RUN_DIR/keys/
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return _user_keys(asdict(self))

    def model_hash(self) -> str:
        """Identifies the architecture (not the loss settings): a checkpoint is refused by a run
        whose hash differs."""
        from switchdit_dist.checkpoint.schema import architecture_hash

        return architecture_hash(asdict(self.model))


# --- loading -----------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and where lossless, convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(
            f"{key}: expected {' or '.join(_type_name(a) for a in typing.get_args(tp))}, "
            f"got {type(value).__name__} {value!r}"
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise UserError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [_user_key(f.name) for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise UserError(f"unknown config key '{prefix}{key}'{_suggest(str(key), names)}")
        tp = hints[_field_name(key)]
        if dataclasses.is_dataclass(tp):
            kwargs[_field_name(key)] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[_field_name(key)] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def _field_name(key: str) -> str:
    """Config keys that are Python keywords (``checkpoint.async``) are fields with a trailing ``_``."""
    return f"{key}_" if keyword.iskeyword(key) else key


def _user_key(name: str) -> str:
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _user_keys(values: Any) -> Any:
    if isinstance(values, dict):
        return {_user_key(k): _user_keys(v) for k, v in values.items()}
    return values


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=12", "optim.lr=3e-4"]`` -> nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected KEY=VALUE, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"override {item!r}: empty key component in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (or start from defaults when ``path`` is None) and apply overrides.

    Relative data paths in the file are taken relative to the current directory, as typed.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path}: expected a mapping of sections at the top level")
    raw = _merge(raw, parse_overrides(list(overrides)))
    try:
        return _build(Config, raw, "")
    except UserError as err:
        where = f"{path}: " if path is not None else ""
        raise UserError(f"{where}{err}") from None


def validate(config: Config, world_size: int, check_data: bool = True) -> None:
    """Checks that need the world size; run on every rank before any process group exists."""
    m, p, t = config.model, config.parallel, config.train
    if m.arch not in ARCHS:
        raise UserError(f"model.arch: expected one of {list(ARCHS)}, got {m.arch!r}")
    if m.size not in SIZES:
        raise UserError(f"model.size: expected one of {list(SIZES)}, got {m.size!r}")
    if m.patch_size not in PATCH_SIZES:
        raise UserError(f"model.patch_size: expected one of {list(PATCH_SIZES)}, got {m.patch_size}")
    if m.input_size % m.patch_size:
        raise UserError(
            f"model.input_size={m.input_size} is not divisible by model.patch_size={m.patch_size}"
        )
    if m.is_moe:
        if m.expert_kind not in EXPERT_KINDS:
            raise UserError(f"model.expert_kind: expected one of {list(EXPERT_KINDS)}, got {m.expert_kind!r}")
        if not 1 <= m.top_k <= m.num_experts:
            raise UserError(f"model.top_k={m.top_k} must be between 1 and model.num_experts={m.num_experts}")
    if t.micro_batch < 1:
        raise UserError(f"train.micro_batch: expected >= 1, got {t.micro_batch}")
    ParallelDims.from_config(config, world_size).check(world="(number of processes)")
    try:
        check_expert_comm(p.expert_comm, m.expert_kind if m.is_moe else "linear")
    except ValueError as err:
        raise UserError(f"parallel.{err}") from None
    if p.placement not in PLACEMENTS:
        raise UserError(f"parallel.placement: expected one of {', '.join(PLACEMENTS)}, got {p.placement!r}")
    if p.placement == "route_aware" and not m.is_moe:
        raise UserError(
            "parallel.placement=route_aware needs a mixture-of-experts model (model.arch=switch-dit)"
        )
    if p.zero_stage not in (0, 1, 2):
        raise UserError(
            f"parallel.zero_stage: expected 0, 1 or 2 (3 does not support MoE), got {p.zero_stage}"
        )
    if p.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"parallel.precision: expected auto, fp32 or bf16, got {p.precision!r}")
    if t.steps < 1:
        raise UserError(f"train.steps: expected a positive number of optimizer steps, got {t.steps}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"train.ema_decay: expected a value in [0, 1), got {t.ema_decay}")
    if t.compile:
        missing = _compile_toolchain_missing()
        if missing:
            raise UserError(f"train.compile=true: {missing}; install it or set train.compile=false")
    if config.diffusion.noise_schedule not in ("linear", "cosine"):
        raise UserError(
            f"diffusion.noise_schedule: expected linear or cosine, got {config.diffusion.noise_schedule!r}"
        )
    if config.checkpoint.on_write_error not in ("stop", "retry"):
        raise UserError(
            f"checkpoint.on_write_error: expected stop or retry, got {config.checkpoint.on_write_error!r}"
        )
    if config.checkpoint.verify not in ("size", "full"):
        raise UserError(f"checkpoint.verify: expected size or full, got {config.checkpoint.verify!r}")
    if config.checkpoint.fallback not in ("previous", "none"):
        raise UserError(f"checkpoint.fallback: expected previous or none, got {config.checkpoint.fallback!r}")
    if config.checkpoint.keep < 1:
        raise UserError(f"checkpoint.keep: expected >= 1, got {config.checkpoint.keep}")
    if config.logging.every < 1:
        raise UserError(f"logging.every: expected >= 1, got {config.logging.every}")
    _check_ranges(config)
    if check_data:
        from switchdit_dist.data.config import validate as validate_data

        validate_data(config.data)


def _compile_toolchain_missing() -> str | None:
    """What torch.compile's inductor backend lacks on this machine (checked before any process
    starts, instead of failing at the first training step): Triton on CUDA, a C++ compiler on CPU."""
    import importlib.util
    import os
    import shutil

    import torch

    if torch.cuda.is_available():
        return None if importlib.util.find_spec("triton") else "the inductor backend needs Triton on CUDA"
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if any(c and shutil.which(c) for c in compilers):
        return None
    return "the inductor backend needs a C++ compiler on CPU (CXX, c++, g++ or clang++)"


def _at_least(low: float) -> tuple[str, Callable[[float], bool]]:
    return f"a number >= {low:g}", lambda v: v >= low


def _above(low: float) -> tuple[str, Callable[[float], bool]]:
    return f"a number > {low:g}", lambda v: v > low


_FRACTION = ("a number in [0, 1)", lambda v: 0 <= v < 1)
# The range of every number the type checks leave open, so that a bad value fails here, in one
# line, instead of in every rank's optimizer or model constructor.
_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "model.input_size": _at_least(1),
    "model.in_channels": _at_least(1),
    "model.num_classes": _at_least(1),
    "model.class_dropout_prob": _FRACTION,
    "model.num_experts": _at_least(1),
    "model.expert_mlp_ratio": _above(0),
    "model.prior_loss_weight": _at_least(0),
    "diffusion.num_timesteps": _at_least(1),
    "parallel.timeout_s": _at_least(1),
    "optim.lr": _above(0),
    "optim.weight_decay": _at_least(0),
    "optim.eps": _above(0),
    "optim.warmup_steps": _at_least(0),
    "optim.grad_clip": _at_least(0),
    "train.global_batch": _at_least(1),
    "train.max_consecutive_nonfinite": _at_least(0),
    "checkpoint.every": _at_least(0),
    "logging.gate_image_every": _at_least(0),
    "logging.val_every": _at_least(0),
    "logging.val_batches": _at_least(1),
}


def _check_ranges(config: Config) -> None:
    for key, (expected, ok) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not (math.isfinite(value) and ok(value)):
            raise UserError(f"{key}: expected {expected}, got {value!r}")
    betas = config.optim.betas
    if len(betas) != 2:
        raise UserError(f"optim.betas: expected two numbers [beta1, beta2], got {betas!r}")
    for i, beta in enumerate(betas):
        if not (math.isfinite(beta) and _FRACTION[1](beta)):
            raise UserError(
                f"optim.betas[{i}]: expected {_FRACTION[0]}, got {beta!r} (optim.betas={betas!r})"
            )


def save_resolved(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
