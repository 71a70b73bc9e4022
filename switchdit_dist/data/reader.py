"""One reader's sample stream for one epoch: read its shards in order, check every sample, pass
bad ones on as errors (or raise), shuffle through a seeded buffer, and skip what was already
consumed before a resume. Runs in a worker process or in the training process alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from switchdit_dist.data.errors import DataError
from switchdit_dist.data.plan import ReaderTask
from switchdit_dist.data.tario import SampleDecoder, iter_raw_samples

Sample = tuple[str, np.ndarray, int]  # key, latent [C, H, W] (stored dtype), class


@dataclass(frozen=True)
class ReaderSpec:
    """Everything a reader needs, picklable for worker processes."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    latent_shape: tuple[int, int, int]
    latent_dtype: str
    num_classes: int
    shuffle_buffer: int
    seed: int
    on_error: str


def _read_shards(spec: ReaderSpec, task: ReaderTask) -> Iterator[Sample | DataError]:
    decode = SampleDecoder(spec.latent_shape, spec.latent_dtype, spec.num_classes)
    stride, offset = task.sample_stride, task.sample_offset
    base = 0  # position of the shard's first sample in the epoch, from manifest counts
    for order_index, shard in enumerate(task.shards):
        url, expected = spec.urls[shard], spec.counts[shard]
        owns_shard_errors = stride == 1 or order_index % stride == offset  # report each once
        seen = 0
        try:
            for raw in iter_raw_samples(url):
                position = base + seen
                seen += 1
                if stride > 1 and position % stride != offset:
                    continue
                try:
                    yield decode(raw, url)
                except DataError as err:
                    if spec.on_error == "raise":
                        raise
                    yield err
            if seen != expected:
                raise DataError(url, None, f"holds {seen} samples but the manifest lists {expected}")
        except DataError as err:
            if spec.on_error == "raise":
                raise
            if owns_shard_errors:
                yield err
        base += expected


def _shuffled(
    items: Iterator[Sample | DataError], size: int, rng: np.random.Generator
) -> Iterator[Sample | DataError]:
    """Reservoir-style shuffle buffer; errors pass straight through, in reading order."""
    buffer: list[Sample] = []
    draws = np.empty(0, dtype=np.int64)
    used = 0
    for item in items:
        if isinstance(item, DataError):
            yield item
            continue
        if len(buffer) < size:
            buffer.append(item)
            continue
        if used == len(draws):  # drawing in blocks keeps the per-sample cost low
            draws, used = rng.integers(0, size, 1024), 0
        j = int(draws[used])
        used += 1
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[int(j)]


def read_task(spec: ReaderSpec, task: ReaderTask, skip: int = 0) -> Iterator[Sample | DataError]:
    """The reader's samples after the first ``skip`` (and the errors met after those)."""
    items = _read_shards(spec, task)
    if spec.shuffle_buffer > 0:
        rng = np.random.default_rng([spec.seed, task.epoch, task.pass_index, task.rank, task.reader])
        items = _shuffled(items, spec.shuffle_buffer, rng)
    produced = 0
    for item in items:
        if isinstance(item, DataError):
            if produced >= skip:  # errors before the resume point are already in the saved count
                yield item
            continue
        produced += 1
        if produced > skip:
            yield item
