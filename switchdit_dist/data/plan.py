"""Who reads what in an epoch: a pure function of the manifest counts, (seed, epoch) and the layout.

Every rank computes the same plan without talking to the others.

* Shard order: a permutation drawn from (seed, epoch) (or the listed order with shuffling off).
* Shard split (at least ``world_size x readers`` shards): shard ``i`` of the epoch's order goes to
  rank ``i % world_size``; a rank's shards are dealt to its readers the same way.
* Sample split (fewer shards than that): every reader reads all shards and keeps the samples
  whose position in the epoch's order, counted over all shards, is its reader number modulo the
  number of readers. Correct but each shard is read by every reader: meant for small data sets.
* Equal steps: each rank's epoch is cut to ``steps_per_epoch x batch_size`` samples, where
  ``steps_per_epoch`` is computed for the worst case over all shard orders: the fewest samples
  any rank can be dealt. It is the same for every epoch and every rank, and the samples past the
  cut (at most about one shard plus one batch per rank) are left out of that epoch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from switchdit_dist.errors import UserError


@dataclass(frozen=True)
class ReaderTask:
    """What one reader (a worker process, or the training process itself) reads in one pass."""

    epoch: int
    pass_index: int  # > 0 only when an epoch had to be topped up after skipped bad data
    rank: int
    reader: int
    shards: tuple[int, ...]  # indices into the shard list, in reading order
    sample_stride: int  # 1 = every sample of those shards; otherwise keep position % stride == offset
    sample_offset: int


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


def splits_by_shard(num_shards: int, world_size: int, readers: int) -> bool:
    return num_shards >= world_size * readers


def reader_task(
    counts: list[int],
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    reader: int,
    readers: int,
    pass_index: int = 0,
) -> ReaderTask:
    order = shard_order(len(counts), seed, epoch, shuffle)
    if splits_by_shard(len(counts), world_size, readers):
        mine = order[rank::world_size][reader::readers]
        return ReaderTask(epoch, pass_index, rank, reader, tuple(mine), 1, 0)
    return ReaderTask(
        epoch, pass_index, rank, reader, tuple(order), world_size * readers, rank * readers + reader
    )


def min_rank_samples(counts: list[int], world_size: int, readers: int) -> int:
    """The fewest samples any rank can be dealt in any epoch (see the module docstring)."""
    if splits_by_shard(len(counts), world_size, readers):
        fewest_shards = len(counts) // world_size
        return sum(sorted(counts)[:fewest_shards])
    total = sum(counts)
    streams = world_size * readers

    def stream_samples(g: int) -> int:
        return (total - g + streams - 1) // streams if total > g else 0

    return min(sum(stream_samples(r * readers + w) for w in range(readers)) for r in range(world_size))


def steps_per_epoch(counts: list[int], world_size: int, readers: int, batch_size: int, where: str) -> int:
    steps = min_rank_samples(counts, world_size, readers) // batch_size
    if steps < 1:
        raise UserError(
            f"{where}: {sum(counts)} samples in {len(counts)} shards give rank-local epochs of fewer than "
            f"batch_size={batch_size} samples with {world_size} ranks; use more data or a smaller batch"
        )
    return steps
