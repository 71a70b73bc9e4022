"""Loading weight files that come from outside, without letting them run code.

Every file the project did not write itself (public checkpoints, files handed over by other
people) goes through :func:`safe_load`:

- safetensors files are read directly (they hold only tensors and string metadata);
- anything else goes through ``torch.load(..., weights_only=True)``, PyTorch's restricted
  unpickler that builds tensors and plain containers and nothing else.

Training checkpoints often carry their run configuration next to the weights: DiT's
``train.py`` stores an ``argparse.Namespace``, Switch-DiT's an OmegaConf ``DictConfig``. Those
classes are not on PyTorch's allow-list, so such a file would be refused although the weights in
it are fine. For a short list of such configuration classes (:data:`INERT_CONFIG_GLOBALS`) the
loader substitutes :class:`InertRecord`, a placeholder that only stores the pickled arguments and
state: the real class is never imported and none of its code runs. Any other global is refused,
with a message that says how to convert the file in an environment that trusts it.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from switchdit_dist.errors import UserError

# Exact names, or prefixes ending in ".", of run-configuration classes replaced by InertRecord.
INERT_CONFIG_GLOBALS: tuple[str, ...] = (
    "argparse.Namespace",
    "omegaconf.",
    "typing.Any",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.Path",
)

# A safetensors header is at most 100 MB by the format's own limit.
_MAX_SAFETENSORS_HEADER = 100_000_000


class InertRecord:
    """Stands in for a configuration object while unpickling; stores what it is given, runs nothing.

    Subclasses are made per substituted name (``source_name``) so that the loaded object says what
    it replaced.
    """

    source_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertRecord:
        record = object.__new__(cls)
        record.__dict__["args"] = args
        record.__dict__["kwargs"] = kwargs
        record.__dict__["state"] = None
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<InertRecord for {self.source_name}>"


def safe_load(path: str | os.PathLike) -> Any:
    """Load a safetensors file (-> dict of tensors, on CPU) or a weights-only torch file.

    Raises :class:`UserError` for a missing file, a file that is neither format, and a file whose
    unpickling would need anything beyond tensors, plain containers and the inert config classes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected a .pt/.pth checkpoint or a .safetensors file)")
    if is_safetensors_file(path):
        return _load_safetensors(path)
    return _load_torch_weights_only(path)


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """Sniff the header: an 8-byte little-endian length followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len <= min(_MAX_SAFETENSORS_HEADER, os.path.getsize(path) - 8)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # the library raises several types for a corrupt file
        raise UserError(f"{path}: not a valid safetensors file ({err})") from None


def _torch_load(path: Path) -> Any:
    with warnings.catch_warnings():
        # Plain pickles use protocols newer than torch.save's; the restricted unpickler handles them.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_torch_weights_only(path: Path) -> Any:
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as err:
        first_error = err
    except Exception as err:
        raise UserError(
            f"{path}: not a PyTorch checkpoint or safetensors file ({type(err).__name__}: {err})"
        ) from None

    unsafe = _unsafe_globals(path)
    if unsafe is None or not unsafe or any(not _is_inert_config(name) for name in unsafe):
        raise UserError(_refusal_message(path, unsafe, first_error))
    substitutes = [
        (type(name.rsplit(".", 1)[-1], (InertRecord,), {"source_name": name}), name) for name in unsafe
    ]
    try:
        with torch.serialization.safe_globals(substitutes):
            return _torch_load(path)
    except pickle.UnpicklingError as err:
        raise UserError(_refusal_message(path, unsafe, err)) from None


def _unsafe_globals(path: Path) -> list[str] | None:
    """Names the restricted unpickler would reject, read statically; None if the file is not a zip."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return None


def _is_inert_config(name: str) -> bool:
    return any(name.startswith(p) if p.endswith(".") else name == p for p in INERT_CONFIG_GLOBALS)


def _refusal_message(path: Path, unsafe: list[str] | None, err: Exception) -> str:
    needs = ", ".join(n for n in unsafe if not _is_inert_config(n)) if unsafe else None
    what = f"it references {needs}" if needs else f"the restricted unpickler rejected it ({_reason(err)})"
    return (
        f"{path}: refused to load: {what}. Unpickling it without restrictions could run arbitrary code, "
        "so only tensors and plain containers are loaded from files from outside. If you trust the file, "
        "convert it once in an environment that may run its code: load it with "
        "torch.load(path, weights_only=False) and save just the weights, either "
        "safetensors.torch.save_file(checkpoint['ema'], 'weights.safetensors') or "
        "torch.save({'model': checkpoint['model'], 'ema': checkpoint['ema']}, 'weights.pt')."
    )


def _reason(err: Exception) -> str:
    """The specific complaint inside torch's long weights-only error text (its boilerplate dropped)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    for paragraph in re.split(r"\n\s*\n", str(err)):
        paragraph = paragraph.split("WeightsUnpickler error:", 1)[-1].strip()
        if paragraph and not paragraph.startswith(boilerplate):
            return " ".join(paragraph.split())
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
