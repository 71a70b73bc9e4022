"""The one-file model format and :func:`load_model`.

A model file is a safetensors file: the full (non-sharded) state dict of a DiT or Switch-DiT plus
string metadata. ``switchdit_config`` holds the model config as JSON with an ``arch`` field
(``"dit"`` or ``"switch-dit"``) and ``switchdit_format_version`` the format version, so the file
alone is enough to rebuild the model. Writers: ``switchdit import`` (public weights) and
``switchdit convert`` (training checkpoints); readers: :func:`load_model` and the sampler.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from switchdit_dist.errors import UserError
from switchdit_dist.models.dit import DiT, DiTConfig
from switchdit_dist.models.registry import ARCH_CONFIGS, arch_of, build_model

FORMAT_VERSION = 1
CONFIG_KEY = "switchdit_config"
VERSION_KEY = "switchdit_format_version"


def config_to_json(config: DiTConfig) -> str:
    return json.dumps({"arch": arch_of(config), **dataclasses.asdict(config)}, sort_keys=True)


def config_from_dict(data: Mapping[str, Any], source: str = "model config") -> DiTConfig:
    """Rebuild a config from its JSON form; every problem is a UserError naming ``source``."""
    arch = data.get("arch")
    if arch not in ARCH_CONFIGS:
        raise UserError(f"{source}: 'arch' must be one of {sorted(ARCH_CONFIGS)}, got {arch!r}")
    cls = ARCH_CONFIGS[arch]
    known = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in data.items() if k != "arch"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source}: invalid {arch} config: {err}") from None


def save_model_file(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    model_config: DiTConfig,
    extra_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``state_dict`` and its config to one safetensors file.

    ``extra_metadata`` values are stored as strings (non-strings JSON-encoded). The file is written
    next to its destination and renamed into place, so a failure leaves no partial file.
    """
    from safetensors.torch import save_file

    metadata = {CONFIG_KEY: config_to_json(model_config), VERSION_KEY: str(FORMAT_VERSION)}
    for key, value in (extra_metadata or {}).items():
        if key in metadata:
            raise ValueError(f"extra_metadata may not set the reserved key {key!r}")
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(_storable(state_dict), str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _storable(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; safetensors refuses tensors that share memory, so copy those."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def read_model_metadata(path: str | os.PathLike) -> tuple[DiTConfig, dict[str, str]]:
    """The config and the raw metadata of a model file, without reading the tensors."""
    from safetensors import safe_open

    from switchdit_dist.export.safe_load import is_safetensors_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file (expected a .safetensors file written by switchdit)")
    if not is_safetensors_file(path):
        raise UserError(f"{path}: not a safetensors file (expected a model file written by switchdit)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as err:
        raise UserError(f"{path}: not a valid safetensors file ({err})") from None
    if CONFIG_KEY not in metadata:
        raise UserError(
            f"{path}: safetensors file without '{CONFIG_KEY}' metadata, so not a switchdit model file; "
            "public DiT/Switch-DiT weights go through `switchdit import` first"
        )
    version = metadata.get(VERSION_KEY)
    if version != str(FORMAT_VERSION):
        raise UserError(f"{path}: '{VERSION_KEY}' is {version!r}; this version reads format {FORMAT_VERSION}")
    try:
        data = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: '{CONFIG_KEY}' metadata is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: '{CONFIG_KEY}' metadata must be a JSON object, got {type(data).__name__}")
    return config_from_dict(data, source=f"{path}: '{CONFIG_KEY}'"), metadata


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """UserError listing missing, unexpected and mis-shaped tensors (a few of each) if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} (config expects {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    not_float = [
        f"{k} ({state_dict[k].dtype})"
        for k in expected
        if k in state_dict and not state_dict[k].is_floating_point()
    ]
    problems = []
    labelled = (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
        ("not floating point", not_float),
    )
    for label, items in labelled:
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise UserError(f"{source}: tensors do not match the model config; " + "; ".join(problems))


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DiT:
    """Build the model described by a model file, load its tensors strictly, return it in eval mode."""
    from safetensors.torch import load_file

    config, _ = read_model_metadata(path)
    # Built on the meta device: no time spent initialising weights that are replaced right away.
    with torch.device("meta"):
        model = build_model(config)
    state_dict = load_file(str(path), device="cpu")
    check_state_dict(model, state_dict, source=str(path))
    model.load_state_dict(state_dict, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.to(device=device).eval()
