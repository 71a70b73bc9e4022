"""The loader the trainer uses: endless, equal steps on every rank, exactly resumable.

Each rank has ``max(1, num_workers)`` readers (see ``plan.py`` for who reads which shards). The
batch is filled one sample at a time, round-robin over the readers that still have samples in
this epoch, so the order depends only on the data, (seed, epoch, rank) and the layout, never on
process timing. The position saved by ``state_dict()`` is the epoch, how many samples each
reader has handed over, whose turn is next, and the skipped-error count; a resumed loader starts
each reader again at its epoch start and drops what it had handed over, so no sample is repeated
or skipped. That replay costs at most one epoch's share of one reader's reading.

If skipped bad data leaves a rank short of its ``steps_per_epoch`` batches, the epoch is topped up
by a second pass over the same shards (new shuffle), logged as a warning.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from switchdit_dist.data.config import DataConfig, resolve_shards, validate
from switchdit_dist.data.errors import DataError
from switchdit_dist.data.plan import ReaderTask, reader_task, splits_by_shard, steps_per_epoch
from switchdit_dist.data.reader import ReaderSpec, Sample, read_task
from switchdit_dist.errors import UserError

log = logging.getLogger(__name__)

PIECE_SAMPLES = 64  # samples a worker sends per message
STATE_VERSION = 1


@dataclass
class Batch:
    latent: torch.Tensor  # [B, C, H, W] float32
    cls: torch.Tensor  # [B] int64
    keys: list[str]


@dataclass
class _Position:
    epoch: int = 0
    pass_index: int = 0
    taken_before_pass: int = 0  # samples of this epoch taken in earlier passes
    consumed: list[int] | None = None  # per reader, in this pass
    finished: list[bool] | None = None  # per reader, in this pass
    turn: int = 0  # the reader that hands over the next sample
    errors: int = 0  # bad samples/shards skipped since the start


# --- readers: the training process itself, or worker processes --------------------------------

_END = "end"


class _LocalReader:
    def __init__(self, spec: ReaderSpec, task: ReaderTask, skip: int):
        self._items = read_task(spec, task, skip)

    def next_item(self) -> Sample | DataError | str:
        return next(self._items, _END)

    def close(self) -> None:
        self._items.close()


def _worker_main(spec: ReaderSpec, task: ReaderTask, skip: int, out: Any) -> None:
    """Worker process: stream pieces of samples, errors in order, then the end marker."""
    keys: list[str] = []
    latents: list[np.ndarray] = []
    classes: list[int] = []

    def flush() -> None:
        if keys:
            out.put(("samples", list(keys), np.stack(latents), np.asarray(classes, dtype=np.int64)))
            keys.clear()
            latents.clear()
            classes.clear()

    try:
        for item in read_task(spec, task, skip):
            if isinstance(item, DataError):
                flush()
                out.put(("error", item))
                continue
            keys.append(item[0])
            latents.append(item[1])
            classes.append(item[2])
            if len(keys) == PIECE_SAMPLES:
                flush()
        flush()
        out.put((_END,))
    except DataError as err:
        out.put(("fatal", err))
    except BaseException:  # report anything else with its traceback; the main process raises it
        out.put(("crash", traceback.format_exc()))


class _WorkerReader:
    def __init__(self, spec: ReaderSpec, task: ReaderTask, skip: int, prefetch: int):
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._queue = ctx.Queue(maxsize=prefetch)
        self._process = ctx.Process(
            target=_worker_main,
            args=(spec, task, skip, self._queue),
            daemon=True,
            name=f"switchdit-data-r{task.rank}w{task.reader}",
        )
        self._process.start()
        self._name = f"data worker {task.reader} of rank {task.rank}"
        self._piece: tuple[list[str], np.ndarray, np.ndarray] | None = None
        self._index = 0

    def _receive(self) -> tuple:
        while True:
            try:
                return self._queue.get(timeout=2.0)
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(f"{self._name} exited with code {self._process.exitcode}") from None

    def next_item(self) -> Sample | DataError | str:
        while self._piece is None:
            message = self._receive()
            kind = message[0]
            if kind == "samples":
                self._piece, self._index = message[1:], 0
            elif kind == "error":
                return message[1]
            elif kind == _END:
                return _END
            elif kind == "fatal":
                raise message[1]
            else:
                raise RuntimeError(f"{self._name} failed:\n{message[1]}")
        keys, latents, classes = self._piece
        i = self._index
        self._index += 1
        if self._index == len(keys):
            self._piece = None
        return keys[i], latents[i], int(classes[i])

    def close(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=10)
        self._queue.cancel_join_thread()
        self._queue.close()


# --- the loader ----------------------------------------------------------------------------------


class LatentLoader:
    def __init__(self, config: DataConfig, *, batch_size: int, rank: int, world_size: int):
        validate(config, check_files=False)
        if batch_size < 1:
            raise UserError(f"batch_size: expected >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside [0, world_size={world_size})")
        self.config = config
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.readers = max(1, config.num_workers)
        shards = resolve_shards(config.shards, config.manifest, key="data.shards")
        self.shards = shards
        self.latent_shape: tuple[int, int, int] = shards.manifest.latent_shape
        self.num_classes: int = shards.num_classes
        self.scale_factor: float = shards.manifest.scale_factor
        self.steps_per_epoch: int = steps_per_epoch(
            shards.counts, world_size, self.readers, batch_size, "data.shards"
        )
        if not splits_by_shard(len(shards.urls), world_size, self.readers):
            log.info(
                "data.shards: %d shards for %d ranks x %d readers: every reader reads all shards and "
                "keeps its share of the samples",
                len(shards.urls),
                world_size,
                self.readers,
            )
        self._spec = ReaderSpec(
            urls=tuple(shards.urls),
            counts=tuple(shards.counts),
            latent_shape=self.latent_shape,
            latent_dtype=shards.manifest.latent_dtype,
            num_classes=self.num_classes,
            shuffle_buffer=config.shuffle_buffer,
            seed=config.seed,
            on_error=config.on_error,
        )
        self._position = _Position()
        self.last_error: DataError | None = None

    @property
    def error_count(self) -> int:
        """Bad samples or shards skipped so far (with on_error=skip)."""
        return self._position.errors

    @property
    def epoch(self) -> int:
        return self._position.epoch

    # --- resume ----------------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "readers": self.readers,
            "batch_size": self.batch_size,
            "seed": self.config.seed,
            "shuffle_buffer": self.config.shuffle_buffer,
            "shuffle_shards": self.config.shuffle_shards,
            "shards": len(self.shards.urls),
            "samples": self.shards.total_samples,
        }

    def state_dict(self) -> dict[str, Any]:
        p = self._position
        return {
            "version": STATE_VERSION,
            "layout": self._layout(),
            "epoch": p.epoch,
            "pass": p.pass_index,
            "taken_before_pass": p.taken_before_pass,
            "consumed": list(p.consumed) if p.consumed is not None else None,
            "finished": list(p.finished) if p.finished is not None else None,
            "turn": p.turn,
            "errors": p.errors,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. A state saved with a different layout (world size,
        workers, batch size, seed, data) cannot be continued mid-epoch: the loader then starts the
        next epoch after the saved one and logs a warning."""
        try:
            if state.get("version") != STATE_VERSION:
                raise KeyError("version")
            epoch, errors = int(state["epoch"]), int(state["errors"])
            layout = state["layout"]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(
                f"loader state: expected a dict from LatentLoader.state_dict(), missing {err}"
            ) from None
        if layout != self._layout():
            changed = sorted(
                k for k in set(layout) | set(self._layout()) if layout.get(k) != self._layout().get(k)
            )
            log.warning(
                "data loader layout changed (%s); resuming at the start of epoch %d instead of mid-epoch",
                ", ".join(changed),
                epoch + 1,
            )
            self._position = _Position(epoch=epoch + 1, errors=errors)
            return
        self._position = _Position(
            epoch=epoch,
            pass_index=int(state["pass"]),
            taken_before_pass=int(state["taken_before_pass"]),
            consumed=None if state["consumed"] is None else [int(c) for c in state["consumed"]],
            finished=None if state["finished"] is None else [bool(f) for f in state["finished"]],
            turn=int(state["turn"]),
            errors=errors,
        )

    # --- iteration -------------------------------------------------------------------------

    def _open(self, task: ReaderTask, skip: int) -> _LocalReader | _WorkerReader:
        if self.config.num_workers == 0:
            return _LocalReader(self._spec, task, skip)
        return _WorkerReader(self._spec, task, skip, self.config.prefetch)

    def _count_error(self, err: DataError) -> None:
        self._position.errors += 1
        self.last_error = err
        log.warning("skipped bad data (%d so far): %s", self._position.errors, err)
        if self._position.errors > self.config.max_errors:
            raise UserError(
                f"more than data.max_errors={self.config.max_errors} bad samples or shards skipped; "
                f"the last: {err}"
            )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield from self._epoch()

    def _epoch(self) -> Iterator[Batch]:
        p = self._position
        take = self.steps_per_epoch * self.batch_size
        keys: list[str] = []
        latents: list[np.ndarray] = []
        classes: list[int] = []
        while True:
            if p.consumed is None:
                p.consumed = [0] * self.readers
                p.finished = [False] * self.readers
                p.turn = 0
            assert p.finished is not None
            taken = p.taken_before_pass + sum(p.consumed)
            if taken >= take:  # resumed right after the epoch's last batch
                break
            readers: list[_LocalReader | _WorkerReader | None] = []
            try:
                for r in range(self.readers):
                    if p.finished[r]:
                        readers.append(None)
                        continue
                    task = reader_task(
                        list(self._spec.counts),
                        self.config.seed,
                        p.epoch,
                        self.config.shuffle_shards,
                        self.rank,
                        self.world_size,
                        r,
                        self.readers,
                        p.pass_index,
                    )
                    readers.append(self._open(task, p.consumed[r]))
                while taken < take and not all(p.finished):
                    r = p.turn
                    item = readers[r].next_item()
                    if isinstance(item, DataError):
                        self._count_error(item)
                        continue
                    if item is _END:
                        p.finished[r] = True
                        readers[r].close()
                        readers[r] = None
                    else:
                        key, latent, cls = item
                        keys.append(key)
                        latents.append(latent)
                        classes.append(cls)
                        p.consumed[r] += 1
                        taken += 1
                    p.turn = self._next_turn(r, p.finished)
                    if len(keys) == self.batch_size:
                        batch = self._collate(keys, latents, classes)
                        keys, latents, classes = [], [], []
                        yield batch
            finally:
                for reader in readers:
                    if reader is not None:
                        reader.close()
            if taken >= take:
                break
            if taken == p.taken_before_pass:
                raise UserError(
                    f"data.shards: rank {self.rank} found no readable samples in epoch {p.epoch}; "
                    f"the last error: {self.last_error}"
                )
            log.warning(
                "rank %d: epoch %d has %d readable samples, %d needed for %d steps; topping up with "
                "another pass over the same shards",
                self.rank,
                p.epoch,
                taken,
                take,
                self.steps_per_epoch,
            )
            p.pass_index += 1
            p.taken_before_pass = taken
            p.consumed = None
        self._position = _Position(epoch=p.epoch + 1, errors=p.errors)

    def _next_turn(self, current: int, finished: list[bool]) -> int:
        for step in range(1, self.readers + 1):
            candidate = (current + step) % self.readers
            if not finished[candidate]:
                return candidate
        return current

    @staticmethod
    def _collate(keys: list[str], latents: list[np.ndarray], classes: list[int]) -> Batch:
        latent = torch.from_numpy(np.stack(latents))
        return Batch(latent=latent.float(), cls=torch.tensor(classes, dtype=torch.int64), keys=keys)
