"""Shards of generated latents with chosen per-shard sample counts, for benchmarks and tests.

Sample ``n`` (counting over all shards) has key ``s{n:08d}``, class ``n % num_classes`` and a
latent whose first element is ``n`` (exact in float16 up to 2048, in float32 up to 2**24), so a
reader can check that the data arrived with the right key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import webdataset as wds

from switchdit_dist.data.format import MANIFEST_NAME, Manifest, ShardInfo, encode_sample, write_manifest


def synthetic_key(index: int) -> str:
    return f"s{index:08d}"


def write_synthetic(
    out: str | Path,
    counts: list[int],
    latent_shape: tuple[int, int, int] = (4, 8, 8),
    dtype: str = "float32",
    num_classes: int = 10,
    seed: int = 0,
    prefix: str = "train",
) -> Manifest:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    infos = []
    index = 0
    for shard, count in enumerate(counts):
        name = f"{prefix}-{shard:06d}.tar"
        with wds.TarWriter(str(out / name), encoder=False, mtime=0) as tar:
            for _ in range(count):
                latent = rng.standard_normal(latent_shape).astype(dtype)
                latent.flat[0] = index
                tar.write(encode_sample(synthetic_key(index), latent, index % num_classes))
                index += 1
        infos.append(ShardInfo(name, count))
    manifest = Manifest(
        latent_shape=tuple(latent_shape),
        latent_dtype=dtype,
        num_classes=num_classes,
        scale_factor=1.0,
        vae="none",
        shards=infos,
        source={"kind": "synthetic", "seed": seed},
    )
    write_manifest(manifest, out / MANIFEST_NAME)
    return manifest
