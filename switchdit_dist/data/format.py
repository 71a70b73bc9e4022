"""The shard format: what one sample holds and what ``manifest.json`` records.

A shard is a plain (uncompressed) tar file. Each sample is a group of consecutive members that
share a key (webdataset's convention: the key is the member path up to the first dot of its
file name):

    <key>.latent.npy   float16 or float32 array [C, H, W], already multiplied by the scale factor
    <key>.cls          the integer class as ASCII text, e.g. ``207``
    <key>.json         optional metadata (source path, flip, ...); the loader does not read it

``manifest.json`` sits beside the shards and lists every shard with its sample count, which is
how the loader gives every rank the same number of steps without reading the data first.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from switchdit_dist.errors import UserError

FORMAT_NAME = "switchdit-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATENT_EXT = "latent.npy"
CLASS_EXT = "cls"
META_EXT = "json"
LATENT_DTYPES = ("float16", "float32")


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's folder
    samples: int


@dataclass
class Manifest:
    latent_shape: tuple[int, int, int]
    latent_dtype: str
    num_classes: int
    scale_factor: float
    vae: str
    shards: list[ShardInfo]
    class_names: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)  # how the shards were made (free form)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "latent_shape": list(self.latent_shape),
            "latent_dtype": self.latent_dtype,
            "num_classes": self.num_classes,
            "scale_factor": self.scale_factor,
            "vae": self.vae,
            "total_samples": self.total_samples,
            "shards": [{"name": s.name, "samples": s.samples} for s in self.shards],
        }
        if self.class_names is not None:
            data["class_names"] = list(self.class_names)
        if self.source:
            data["source"] = self.source
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """Build from parsed JSON; every problem names the file and the key."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")

        def need(key: str, kind: type | tuple[type, ...], what: str) -> Any:
            if key not in data:
                raise UserError(f"{where}: missing key '{key}' ({what})")
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UserError(f"{where}: key '{key}': expected {what}, got {value!r}")
            return value

        if data.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise UserError(f"{where}: key 'format': expected '{FORMAT_NAME}', got {data['format']!r}")
        version = data.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise UserError(
                f"{where}: key 'version': this code reads version {FORMAT_VERSION}, got {version!r}"
            )
        shape = need("latent_shape", list, "a list of three positive integers [C, H, W]")
        if len(shape) != 3 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
        ):
            raise UserError(
                f"{where}: key 'latent_shape': expected three positive integers [C, H, W], got {shape!r}"
            )
        dtype = need("latent_dtype", str, f"one of {list(LATENT_DTYPES)}")
        if dtype not in LATENT_DTYPES:
            raise UserError(
                f"{where}: key 'latent_dtype': expected one of {list(LATENT_DTYPES)}, got {dtype!r}"
            )
        num_classes = need("num_classes", int, "a positive integer")
        if num_classes < 1:
            raise UserError(f"{where}: key 'num_classes': expected a positive integer, got {num_classes}")
        scale = need("scale_factor", (int, float), "a positive number")
        if not scale > 0:
            raise UserError(f"{where}: key 'scale_factor': expected a positive number, got {scale}")
        vae = need("vae", str, "the VAE's name or 'none'")
        raw_shards = need("shards", list, "a list of {name, samples} objects")
        if not raw_shards:
            raise UserError(f"{where}: key 'shards' is empty; expected at least one shard")
        shards = []
        for i, entry in enumerate(raw_shards):
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and entry["name"]
                and isinstance(entry.get("samples"), int)
                and not isinstance(entry.get("samples"), bool)
                and entry["samples"] >= 0
            )
            if not ok:
                raise UserError(
                    f"{where}: key 'shards[{i}]': expected an object with a 'name' string and "
                    f"a 'samples' integer >= 0, got {entry!r}"
                )
            shards.append(ShardInfo(entry["name"], entry["samples"]))
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise UserError(f"{where}: key 'shards': shard '{dup}' is listed twice")
        class_names = data.get("class_names")
        if class_names is not None and (
            not isinstance(class_names, list)
            or len(class_names) != num_classes
            or not all(isinstance(c, str) for c in class_names)
        ):
            raise UserError(f"{where}: key 'class_names': expected {num_classes} strings (num_classes)")
        source = data.get("source", {})
        return cls(
            latent_shape=(shape[0], shape[1], shape[2]),
            latent_dtype=dtype,
            num_classes=num_classes,
            scale_factor=float(scale),
            vae=vae,
            shards=shards,
            class_names=class_names,
            source=source if isinstance(source, dict) else {},
        )


def is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def read_manifest(url: str) -> Manifest:
    """Read a manifest from a local path or any URL webdataset's ``gopen`` understands."""
    try:
        if is_local(url):
            with open(local_path(url), "rb") as f:
                raw = f.read()
        else:
            from webdataset.gopen import gopen

            with gopen(url, "rb") as f:
                raw = f.read()
    except OSError as err:
        raise UserError(f"{url}: cannot read the manifest ({err.strerror or err})") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{url}: not valid JSON ({err}); expected a shard manifest") from None
    return Manifest.from_json(data, url)


def write_manifest(manifest: Manifest, path: str | Path) -> None:
    """Write atomically, so a reader never sees half a manifest."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    os.replace(tmp, path)


def shard_name(url: str) -> str:
    """The name a shard has in its manifest: the file name of the URL (for ``pipe:`` commands the
    last word ending in ``.tar``)."""
    if url.startswith("pipe:"):
        words = [w for w in url[5:].split() if ".tar" in w]
        url = words[-1] if words else url
    return posixpath.basename(url.rstrip("/").split("?")[0])


def encode_latent(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(latent), allow_pickle=False)
    return buf.getvalue()


def encode_sample(
    key: str, latent: np.ndarray, cls: int, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A sample as the byte-valued dict webdataset's ``TarWriter(encoder=False)`` writes."""
    if "." in posixpath.basename(key):
        raise ValueError(f"sample key {key!r} must not contain a dot in its last path component")
    sample: dict[str, Any] = {
        "__key__": key,
        LATENT_EXT: encode_latent(latent),
        CLASS_EXT: str(int(cls)).encode("ascii"),
    }
    if meta is not None:
        sample[META_EXT] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return sample
