"""scikit-learn's handwritten digits as a stand-in latent data set (no download).

1,797 real 8x8 images of the digits 0-9 with values 0..16, scaled to [-1, 1] and upsampled
bilinearly to ``size x size``; one channel plays the role of a latent ([1, size, size] float32,
scale factor 1.0, VAE "none"). The train/validation split is drawn from a fixed seed, so the
output is the same on every run and machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from switchdit_dist.data.writers.shardset import SampleRecord, ShardSetResult, ShardSetSpec, write_shard_set
from switchdit_dist.errors import UserError

SPLIT_SEED = 0
NUM_CLASSES = 10


def digits_latents(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All digits as float32 [N, 1, size, size] in [-1, 1], and their classes [N]."""
    from switchdit_dist.extras import need

    digits = need("sklearn.datasets", "the digits data").load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp_(-1.0, 1.0).numpy(), digits.target.astype(np.int64)


def split_indices(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices, each sorted; the validation set is a seeded random subset."""
    n_val = int(round(n * val_fraction))
    chosen = np.random.default_rng(SPLIT_SEED).permutation(n)[:n_val]
    val = np.sort(chosen)
    train = np.setdiff1d(np.arange(n), val)
    return train, val


def write_digits(
    out: str | Path, shards: int = 8, size: int = 16, val_fraction: float = 0.0, log=print
) -> dict[str, ShardSetResult]:
    if shards < 1:
        raise UserError(f"--shards: expected >= 1, got {shards}")
    if size < 8:
        raise UserError(f"--size: expected >= 8 (the digits are 8x8), got {size}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction: expected a value in [0, 1), got {val_fraction}")
    latents, classes = digits_latents(size)
    train, val = split_indices(len(latents), val_fraction)
    per_shard = -(-len(train) // shards)
    results = {}
    for split, indices, folder in (("train", train, Path(out)), ("val", val, Path(out) / "val")):
        if len(indices) == 0:
            continue

        def produce(start: int, stop: int, indices: np.ndarray = indices) -> Iterator[SampleRecord]:
            for i in indices[start:stop]:
                yield f"digits_{int(i):04d}", latents[i], int(classes[i]), None

        spec = ShardSetSpec(
            total=len(indices),
            samples_per_shard=per_shard,
            latent_shape=(1, size, size),
            latent_dtype="float32",
            num_classes=NUM_CLASSES,
            scale_factor=1.0,
            vae="none",
            class_names=[str(d) for d in range(NUM_CLASSES)],
            source={"kind": "digits", "size": size, "split": split, "val_fraction": val_fraction},
            prefix=split,
        )
        results[split] = write_shard_set(folder, spec, produce, log=log)
    return results
