"""``switchdit prepare manifest``: a manifest for shards written by other tools.

Shards made with webdataset's ``ShardWriter``/``TarWriter`` (samples holding ``latent.npy`` and
``cls``) or plain ``tar`` need only this to be read by the loader: every shard is read once to
count its samples, the latent shape and dtype come from the first sample, and every sample is
checked the same way the loader checks it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from switchdit_dist.data.format import LATENT_EXT, MANIFEST_NAME, Manifest, ShardInfo, write_manifest
from switchdit_dist.data.tario import SampleDecoder, iter_raw_samples
from switchdit_dist.errors import UserError


def _local_shards(spec: str) -> list[Path]:
    from webdataset.shardlists import expand_urls

    if os.path.isdir(spec):
        paths = sorted(Path(spec).glob("*.tar"))
        if not paths:
            raise UserError(f"--shards: folder {spec} holds no .tar files")
        return paths
    paths = [Path(p) for p in expand_urls(spec)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"--shards: {len(missing)} of {len(paths)} files do not exist, e.g. {missing[0]}")
    if len({p.parent.resolve() for p in paths}) != 1:
        raise UserError("--shards: the shards must sit in one folder (the manifest goes beside them)")
    return paths


def _first_latent_format(path: Path) -> tuple[tuple[int, int, int], str]:
    for raw in iter_raw_samples(str(path)):
        data = raw.get(LATENT_EXT)
        if isinstance(data, bytes):
            array = np.load(io.BytesIO(data), allow_pickle=False)
            if array.ndim != 3:
                raise UserError(
                    f"{path}: sample '{raw['__key__']}': latent shape {list(array.shape)}, expected [C, H, W]"
                )
            if array.dtype.name not in ("float16", "float32"):
                raise UserError(
                    f"{path}: sample '{raw['__key__']}': latent dtype {array.dtype.name}, "
                    f"expected float16 or float32"
                )
            return (array.shape[0], array.shape[1], array.shape[2]), array.dtype.name
    raise UserError(f"{path}: no sample with a '{LATENT_EXT}' member")


def write_manifest_for(
    spec: str, num_classes: int = 0, scale_factor: float = 1.0, vae: str = "unknown", log=print
) -> Manifest:
    paths = _local_shards(spec)
    folder = paths[0].parent
    target = folder / MANIFEST_NAME
    if target.exists():
        raise UserError(f"{target} already exists; delete it to write a new one")
    shape, dtype = _first_latent_format(paths[0])
    # classes are checked against the limit afterwards, so read with no upper bound first
    decode = SampleDecoder(shape, dtype, num_classes or np.iinfo(np.int64).max)
    infos = []
    largest = -1
    for path in paths:
        count = 0
        for raw in iter_raw_samples(str(path)):
            _, _, cls = decode(raw, str(path))
            largest = max(largest, cls)
            count += 1
        infos.append(ShardInfo(path.name, count))
        log(f"{path}: {count} samples")
    manifest = Manifest(
        latent_shape=shape,
        latent_dtype=dtype,
        num_classes=num_classes or largest + 1,
        scale_factor=scale_factor,
        vae=vae,
        shards=infos,
        source={"kind": "indexed"},
    )
    write_manifest(manifest, target)
    log(f"wrote {target}: {manifest.total_samples} samples in {len(infos)} shards")
    return manifest
