"""Writing a set of shards that survives interruption.

Samples are numbered 0..total-1 by the writer's source in a fixed order, and shard ``i`` always
holds samples ``[i * samples_per_shard, (i + 1) * samples_per_shard)``. Each shard is written to
``<name>.partial`` and renamed when complete, so a file with the final name is always whole. A
second run with the same plan keeps every finished shard and redoes the rest; ``plan.json``
records the plan so that a run with different settings refuses to mix its shards with old ones.
The manifest is written last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from switchdit_dist.data.format import MANIFEST_NAME, Manifest, ShardInfo, encode_sample, write_manifest
from switchdit_dist.errors import UserError

PLAN_NAME = "plan.json"
TAR_MTIME = 0  # fixed member times: the same input gives byte-identical shards

SampleRecord = tuple[str, np.ndarray, int, dict[str, Any] | None]  # key, latent, class, metadata


@dataclass
class ShardSetSpec:
    total: int  # samples
    samples_per_shard: int
    latent_shape: tuple[int, int, int]
    latent_dtype: str
    num_classes: int
    scale_factor: float
    vae: str
    class_names: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest and the plan
    prefix: str = "train"

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.samples_per_shard)

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.samples_per_shard
        return start, min(start + self.samples_per_shard, self.total)


@dataclass
class ShardSetResult:
    manifest: Manifest
    written: list[str]
    kept: list[str]


def _plan_record(spec: ShardSetSpec) -> dict[str, Any]:
    return {
        "total": spec.total,
        "samples_per_shard": spec.samples_per_shard,
        "prefix": spec.prefix,
        "latent_shape": list(spec.latent_shape),
        "latent_dtype": spec.latent_dtype,
        "source": spec.source,
    }


def _check_plan(out: Path, spec: ShardSetSpec) -> None:
    path = out / PLAN_NAME
    record = json.loads(json.dumps(_plan_record(spec)))  # normalise tuples etc.
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != record:
            raise UserError(
                f"{out}: holds shards prepared with different settings ({path}); use another --out "
                f"folder or delete this one"
            )
        return
    existing = sorted(out.glob(f"{spec.prefix}-*.tar"))
    if existing:
        raise UserError(
            f"{out}: already holds shards ({existing[0].name}, ...) but no {PLAN_NAME}; "
            f"use another --out folder or delete them"
        )
    path.write_text(json.dumps(record, indent=1) + "\n")


def write_shard_set(
    out_dir: str | Path,
    spec: ShardSetSpec,
    produce: Callable[[int, int], Iterable[SampleRecord]],
    log: Callable[[str], None] = print,
) -> ShardSetResult:
    """Write the shards ``produce(start, stop)`` fills, skipping those already complete."""
    if spec.total < 1:
        raise UserError("nothing to write: the source holds no samples")
    if spec.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard: expected >= 1, got {spec.samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_plan(out, spec)
    dtype = np.dtype(spec.latent_dtype)
    written: list[str] = []
    kept: list[str] = []
    infos: list[ShardInfo] = []
    for index in range(spec.num_shards):
        name = spec.shard_name(index)
        start, stop = spec.shard_range(index)
        infos.append(ShardInfo(name, stop - start))
        final = out / name
        if final.exists():
            kept.append(name)
            log(f"kept {final} (already complete)")
            continue
        partial = out / (name + ".partial")
        count = 0
        with open(partial, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as tar:
            for key, latent, cls, meta in produce(start, stop):
                if tuple(latent.shape) != tuple(spec.latent_shape):
                    raise UserError(
                        f"sample '{key}': latent shape {list(latent.shape)}, expected "
                        f"{list(spec.latent_shape)} like the rest of the data set"
                    )
                if not 0 <= int(cls) < spec.num_classes:
                    raise UserError(f"sample '{key}': class {cls} outside [0, {spec.num_classes})")
                stored = latent.astype(dtype, copy=False)
                if not np.isfinite(stored).all():  # also catches float16 overflow of the cast
                    raise UserError(
                        f"sample '{key}' ({meta or {}}): latent has NaN or Inf values as {dtype.name}"
                    )
                tar.write(encode_sample(key, stored, int(cls), meta))
                count += 1
        if count != stop - start:
            raise RuntimeError(f"{name}: the source produced {count} samples for [{start}, {stop})")
        os.replace(partial, final)
        written.append(name)
        log(f"wrote {final} ({count} samples)")
    manifest = Manifest(
        latent_shape=spec.latent_shape,
        latent_dtype=spec.latent_dtype,
        num_classes=spec.num_classes,
        scale_factor=spec.scale_factor,
        vae=spec.vae,
        shards=infos,
        class_names=spec.class_names,
        source=spec.source,
    )
    write_manifest(manifest, out / MANIFEST_NAME)
    log(f"wrote {out / MANIFEST_NAME}: {manifest.total_samples} samples in {len(infos)} shards")
    return ShardSetResult(manifest, written, kept)
