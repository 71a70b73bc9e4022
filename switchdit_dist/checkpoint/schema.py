"""What a checkpoint holds: its entries, its header (``meta.json``) and the model's identity.

Entries (DCP keys; ``name`` is the single-device model's parameter name, experts by global id):

    model/{name}              fp32 master weight, flattened
    optim/{name}/exp_avg      Adam first moment, flattened
    optim/{name}/exp_avg_sq   Adam second moment, flattened
    optim/{name}/step         Adam step count (0-dim fp32)
    ema/{name}                EMA, fp32, in the parameter's shape
    trainer/state             TrainerState as UTF-8 JSON (uint8)
    trainer/rank_{r}          RankState of rank r, torch.save bytes (uint8; loaded weights_only)

Weights and moments are flat because ZeRO 1/2 partitions a parameter as a flat range of its
elements: each rank writes the range it holds, and a reader of another layout asks for the ranges
it needs. ``FORMAT_VERSION`` changes whenever a reader of the previous version could misread a new
checkpoint; readers refuse newer versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from switchdit_dist.errors import UserError

FORMAT_VERSION = 2  # 1: DeepSpeed's files plus a portable copy (before this format)
META = "meta.json"
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
LATEST = "latest"

# ModelSection keys that are training settings, not architecture: they may change on resume.
TRAINING_KEYS = ("prior_loss_weight", "class_dropout_prob")


class FormatError(UserError):
    """A checkpoint of another format version: not damage, so never passed over for an older one."""


# --- entry keys ---------------------------------------------------------------------------------

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
TRAINER_STATE_KEY = "trainer/state"


def model_key(name: str) -> str:
    return f"model/{name}"


def optim_key(name: str, key: str) -> str:
    return f"optim/{name}/{key}"


def ema_key(name: str) -> str:
    return f"ema/{name}"


def rank_key(rank: int) -> str:
    return f"trainer/rank_{rank}"


def names_under(keys, prefix: str) -> list[str]:
    """Parameter names of the ``prefix/`` entries (``model``, ``ema``) among ``keys``."""
    start = f"{prefix}/"
    return sorted(k[len(start) :] for k in keys if k.startswith(start))


# --- the model's identity -----------------------------------------------------------------------


def architecture(model_section: dict[str, Any]) -> dict[str, Any]:
    """What makes two models the same network: every model key except the training settings, the
    resolved widths (``hidden_size``, ``depth``, ...) and whether a null-class embedding exists
    (``class_dropout_prob > 0`` adds one row to the label table; its value is a training setting)."""
    from switchdit_dist.config import ModelSection

    section = ModelSection(**model_section)
    # the built config holds every key the network uses (a DiT's has no expert keys)
    built = dataclasses.asdict(section.build_config())
    out = {k: v for k, v in built.items() if k not in TRAINING_KEYS}
    out.update(arch=section.arch, size=section.size, null_class=section.class_dropout_prob > 0)
    return out


def architecture_hash(model_section: dict[str, Any]) -> str:
    text = json.dumps(architecture(model_section), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_settings(model_section: dict[str, Any]) -> dict[str, Any]:
    return {k: model_section[k] for k in TRAINING_KEYS if k in model_section}


def architecture_changes(saved_section: dict[str, Any], current_section: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every architecture key that differs: model-section keys first
    (``model.size: 'tiny' -> 'S'``), then the resolved widths they imply (``hidden_size: 96 -> 384``)."""
    saved, current = architecture(saved_section), architecture(current_section)
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    section = set(saved_section) | set(current_section)
    ordered = [k for k in changed if k in section] + [k for k in changed if k not in section]
    return [f"{'model.' if k in section else ''}{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in ordered]


# --- the header ---------------------------------------------------------------------------------


@dataclass
class CheckpointMeta:
    """``meta.json``: read before anything else, by the trainer, ``convert``, ``verify`` and the
    SLURM pre-check."""

    step: int
    world_size: int  # the layout that wrote it
    ep_size: int
    zero_stage: int
    precision: str
    model: dict[str, Any]  # the config's model section
    format_version: int = FORMAT_VERSION
    architecture_hash: str = ""
    torch_version: str = field(default_factory=lambda: torch.__version__)

    def __post_init__(self) -> None:
        if not self.architecture_hash:
            self.architecture_hash = architecture_hash(self.model)

    @property
    def layout(self) -> tuple[int, int, int]:
        return (self.world_size, self.ep_size, self.zero_stage)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, directory: Path) -> CheckpointMeta:
        file = Path(directory) / META
        if not file.is_file():
            raise UserError(f"checkpoint {directory}: {META} is missing (it says what the checkpoint holds)")
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise UserError(f"{file}: expected a JSON object")
        version = data.get("format_version")
        if version is None:
            raise FormatError(
                f"checkpoint {directory} is in the old format (DeepSpeed's files, format 1), which this "
                f"version no longer reads (format {FORMAT_VERSION}); resume it with the release that wrote "
                "it, or start a new --run-dir"
            )
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise FormatError(
                f"checkpoint {directory} has format version {version!r}, newer than this version of "
                f"switchdit reads ({FORMAT_VERSION}); upgrade switchdit_dist to read it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(k for k in ("step", "world_size", "ep_size", "zero_stage", "model") if k not in data)
        if missing:
            raise UserError(f"{file}: lacks key(s) {missing}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as err:
            raise UserError(f"{file}: invalid header ({err})") from None

    def check_model(self, model_section: dict[str, Any], where: str) -> dict[str, tuple[Any, Any]]:
        """Refuse another architecture (naming every changed key); return the training settings
        that changed, ``{model.key: (saved, current)}``, which a resume accepts."""
        if architecture_hash(model_section) != self.architecture_hash:
            try:
                changes = architecture_changes(self.model, model_section)
            except (TypeError, ValueError) as err:
                changes = [f"the saved model section is not valid here ({err})"]
            listed = ", ".join(changes) or "architecture changed"
            raise UserError(
                f"{where} was written for a different model ({listed}); "
                "use a new --run-dir, or restore the model settings to resume"
            )
        saved, current = training_settings(self.model), training_settings(model_section)
        return {f"model.{k}": (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}


# --- trainer state ------------------------------------------------------------------------------


@dataclass
class TrainerState:
    """Counters and schedule, the same on every rank (entry ``trainer/state``)."""

    step: int
    global_steps: int  # DeepSpeed's counters
    global_samples: int
    skipped_steps: int
    skipped_total: int  # non-finite steps the trainer skipped
    lr_scheduler: dict[str, Any] | None

    def encode(self) -> torch.Tensor:
        return _bytes_tensor(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())

    @classmethod
    def decode(cls, tensor: torch.Tensor, where: str) -> TrainerState:
        try:
            return cls(**json.loads(_tensor_bytes(tensor).decode()))
        except (ValueError, TypeError) as err:
            raise UserError(f"{where}: unreadable {TRAINER_STATE_KEY} ({err})") from None


@dataclass
class RankState:
    """One rank's side state (entry ``trainer/rank_{r}``): its data position and RNG states."""

    loader: dict[str, Any]
    rng: dict[str, Any]

    def encode(self) -> torch.Tensor:
        buffer = io.BytesIO()
        torch.save({"loader": self.loader, "rng": self.rng}, buffer)
        return _bytes_tensor(buffer.getvalue())

    @classmethod
    def decode(cls, tensor: torch.Tensor, where: str) -> RankState:
        try:
            data = torch.load(io.BytesIO(_tensor_bytes(tensor)), map_location="cpu", weights_only=True)
            return cls(loader=data["loader"], rng=data["rng"])
        except Exception as err:  # a damaged entry: any unpickling error
            raise UserError(f"{where}: unreadable side state ({type(err).__name__}: {err})") from None


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().numpy().tobytes()
