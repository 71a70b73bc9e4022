"""The checkpoint directory protocol: writing crash-safely (synchronously or in the background),
finding the checkpoint to resume from, verifying it and reading it in one process.

Writing, on every rank (collective over a CPU process group of all ranks):

1. rank 0 clears a leftover directory of the same step (a crash at this very step), all ranks wait;
2. DCP writes the entries, every rank its share (``dcp_io``); with ``asynchronous=True`` the
   entries are first copied to CPU memory and the rest runs in a background thread, at most one
   save in flight;
3. every rank checksums its share of the files; rank 0 writes ``meta.json``, ``manifest.json``
   (every file's size and checksum), then ``COMPLETE``, then moves ``latest`` (atomically) and
   prunes old checkpoints.

A crash anywhere before step 3's ``COMPLETE`` leaves a directory without it, which is never
resumed from; ``latest`` keeps naming the previous complete checkpoint. A failed write (a full
disk raises ``OSError``, DCP's ``CheckpointException`` or a ``RuntimeError`` from torch's writer,
depending on where the space runs out) is one outcome on every rank: its message names the
directory, each failing rank's cause, the bytes the checkpoint needs and the bytes free there;
rank 0 removes the partial directory (the run's lock means no other job writes in it), and
``latest`` and the older checkpoints stay untouched.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from switchdit_dist.checkpoint import manifest
from switchdit_dist.checkpoint.manifest import Damage, Damaged, Manifest
from switchdit_dist.checkpoint.schema import COMPLETE, LATEST, META, CheckpointMeta
from switchdit_dist.errors import UserError
from switchdit_dist.train import comm

if TYPE_CHECKING:  # DCP is imported where it is used: verifying a checkpoint does not need it
    from switchdit_dist.checkpoint.dcp_io import Range

# --- names and finding --------------------------------------------------------------------------


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_")[-1])


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """Every ``step_*`` directory, complete or not, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: step_of(p.name))


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    return [p for p in step_dirs(ckpt_dir) if is_complete(p)]


def find_resume_point(ckpt_dir: Path) -> Path | None:
    """The checkpoint named by ``latest`` if complete, else the newest complete one."""
    latest = Path(ckpt_dir) / LATEST
    if latest.is_file():
        candidate = Path(ckpt_dir) / latest.read_text().strip()
        if candidate.is_dir() and is_complete(candidate):
            return candidate
    complete = complete_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints to try, best first: ``find_resume_point``, then the older ones."""
    first = find_resume_point(ckpt_dir)
    if first is None:
        return []
    older = [p for p in reversed(complete_checkpoints(ckpt_dir)) if step_of(p.name) < step_of(first.name)]
    return [first, *older]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- verifying ----------------------------------------------------------------------------------


def verify(path: Path, full: bool, rank: int = 0, world_size: int = 1) -> list[Damage]:
    """This rank's findings on checkpoint ``path``: sizes of every file (all ranks check them, it is
    a ``stat`` each) and, with ``full``, the checksums of its share of the files. Raises ``Damaged``
    when the manifest itself is missing or unreadable."""
    path = Path(path)
    if not is_complete(path):
        return [Damage(COMPLETE, "missing: the checkpoint was not finished")]
    written = Manifest.read(path)
    damages = manifest.check_sizes(path, written)
    if full:
        bad = {d.file for d in damages}
        sound = [name for name in written.files if name not in bad]
        damages += manifest.check_checksums(path, written, manifest.share(sound, rank, world_size))
    return damages


def verify_or_raise(path: Path, full: bool) -> None:
    """In one process: raise ``Damaged`` naming every damaged file."""
    damages = verify(path, full)
    if damages:
        raise Damaged(path, damages)


# --- reading in one process ---------------------------------------------------------------------


def read_entries(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Whole entries of a checkpoint written by any layout, in this process."""
    from switchdit_dist.checkpoint import dcp_io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP's "assuming the intent is to load in a single process"
            return dcp_io.read(path, keys)
    except UserError:
        raise
    except dcp_io.ERRORS as err:  # DCP's CheckpointException, a truncated data file
        raise UserError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {err})") from None


def read_weights(path: Path, kind: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The ``model`` (fp32 masters) or ``ema`` weights of every parameter in ``shapes``, by name,
    in the parameters' shapes."""
    from switchdit_dist.checkpoint import dcp_io

    index = dcp_io.tensor_index(path)
    prefix = f"{kind}/"
    keys = [k for k in index if k.startswith(prefix)]
    state = read_entries(path, keys)
    out = {}
    for key, tensor in state.items():
        name = key[len(prefix) :]
        shape = shapes.get(name)
        out[name] = tensor.reshape(shape) if shape is not None and tensor.numel() == shape.numel() else tensor
    return out


# --- writing ------------------------------------------------------------------------------------


@dataclass
class SaveRequest:
    step: int
    state: dict[str, torch.Tensor]  # this rank's entries
    ranges: dict[str, Range]  # entries that are a flat range of a larger one
    meta: CheckpointMeta
    fault_hook: Callable[[int], None] | None = None  # tests: runs after the data files are written


@dataclass
class SaveOutcome:
    step: int
    path: Path
    ok: bool
    error: str = ""  # why it failed: the same one-paragraph message on every rank
    written_s: float = 0.0  # from the start of the save to COMPLETE (or the failure)


class CheckpointWriter:
    """Writes ``RUN_DIR/checkpoints/step_*`` on every rank; at most one save in flight."""

    def __init__(self, ckpt_dir: Path, rank: int, world_size: int, keep: int, group, asynchronous: bool):
        self.dir = Path(ckpt_dir)
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.group = group
        self.asynchronous = asynchronous
        self.pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.outcomes: list[SaveOutcome] = []

    def save(self, request: SaveRequest) -> SaveOutcome | None:
        """Write a checkpoint. Synchronous: returns its outcome. Asynchronous: returns once the
        entries are copied aside (None); ``wait`` or the next ``save`` returns the outcome."""
        if self.pending is not None:  # at most one save in flight: the caller waits for it first
            raise RuntimeError("a checkpoint save is still in flight; wait() for it before saving again")
        start = time.perf_counter()
        path = self.dir / tag_for(request.step)
        error = self._prepare(path)
        errors = comm.all_gather_objects(error, self.group)
        if any(e is not None for e in errors):
            return self._failed(request, path, start, errors)
        if not self.asynchronous:
            return self._finish(request, path, start, self._write(request, path))
        from switchdit_dist.checkpoint import dcp_io

        try:
            upload = dcp_io.async_save(request.state, request.ranges, path, self.group)
        except dcp_io.ERRORS as err:  # the staging copy failed (out of memory): nothing was started
            return self._record(SaveOutcome(request.step, path, False, f"{path}: {describe_error(err)}"))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-finish")
        self.pending = self._executor.submit(self._finish_after, request, path, start, upload)
        return None

    def wait(self) -> SaveOutcome | None:
        """The outcome of the save in flight, once it is done (None if there is none)."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        return pending.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # --- the steps ---

    def _prepare(self, path: Path) -> str | None:
        if self.rank != 0:
            return None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a leftover from a crash at this very step
                shutil.rmtree(path)
            path.mkdir()
        except OSError as err:
            return str(err)
        return None

    def _write(self, request: SaveRequest, path: Path) -> str | None:
        from switchdit_dist.checkpoint import dcp_io

        try:
            dcp_io.save(request.state, request.ranges, path, self.group)
        except dcp_io.ERRORS as err:  # CheckpointException (raised on every rank) or OSError
            return describe_error(err)
        return None

    def _finish_after(self, request: SaveRequest, path: Path, start: float, upload: Future) -> SaveOutcome:
        from switchdit_dist.checkpoint import dcp_io

        try:
            upload.result()
            error = None
        except dcp_io.ERRORS as err:
            error = describe_error(err)
        return self._finish(request, path, start, error)

    def _finish(self, request: SaveRequest, path: Path, start: float, error: str | None) -> SaveOutcome:
        files: dict[str, manifest.FileEntry] = {}
        if error is None:
            try:
                if request.fault_hook is not None:
                    request.fault_hook(request.step)
                from switchdit_dist.checkpoint import dcp_io

                names = [".metadata", *dcp_io.data_files(path)]
                for name in manifest.share(names, self.rank, self.world_size):
                    files[name] = manifest.describe(path / name)
            except Exception as err:  # a file gone or unreadable; a test's injected fault
                error = str(err) if isinstance(err, UserError) else describe_error(err)
        parts = comm.all_gather_objects((files, error), self.group)
        errors = [e for _, e in parts]
        if all(e is None for e in errors) and self.rank == 0:
            try:
                self._complete(request, path, {k: v for part, _ in parts for k, v in part.items()})
            except Exception as err:  # OSError, or a RuntimeError from a full disk under json/fsync
                error = describe_error(err)
        if any(e is not None for e in errors):  # every rank knows already: no further collective
            return self._failed(request, path, start, errors)
        final = comm.all_gather_objects(error, self.group)  # rank 0's verdict on the last files
        if any(e is not None for e in final):
            return self._failed(request, path, start, final)
        return self._record(SaveOutcome(request.step, path, True, "", time.perf_counter() - start))

    def _failed(
        self, request: SaveRequest, path: Path, start: float, errors: list[str | None]
    ) -> SaveOutcome:
        """The outcome of a failed save, the same on every rank (all ranks know every error).
        Rank 0 removes the partial directory: ``latest`` never named it, and a retry or a later
        save should find the space it took."""
        needed = comm.all_gather_objects(_nbytes(request.state), self.group)
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        comm.barrier(self.group)  # the space is free (and measured) after the removal
        causes = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
        # An upper bound: DCP writes an entry that several ranks hold (replicated weights) only once.
        message = f"{path}: {causes}. The checkpoint needs up to {_mib(sum(needed))}"
        try:
            message += f"; {_mib(shutil.disk_usage(self.dir).free)} is free on {self.dir}'s filesystem"
        except OSError:
            pass
        message += "; the partial directory was removed"
        return self._record(SaveOutcome(request.step, path, False, message, time.perf_counter() - start))

    def _complete(self, request: SaveRequest, path: Path, files: dict[str, manifest.FileEntry]) -> None:
        atomic_write_text(path / META, request.meta.to_json())
        files[META] = manifest.describe(path / META)
        Manifest(step=request.step, files=files).write(path)
        atomic_write_text(path / COMPLETE, f"{request.step}\n")
        atomic_write_text(self.dir / LATEST, path.name + "\n")
        self._prune(current=path)

    def _prune(self, current: Path) -> None:
        complete = complete_checkpoints(self.dir)
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        # Incomplete directories older than the newest complete one are crash leftovers.
        for leftover in step_dirs(self.dir):
            if not is_complete(leftover) and step_of(leftover.name) < step_of(current.name):
                shutil.rmtree(leftover, ignore_errors=True)

    def _record(self, outcome: SaveOutcome) -> SaveOutcome:
        self.outcomes.append(outcome)
        return outcome


def describe_error(err: BaseException) -> str:
    """One line for a failed write. DCP wraps each rank's exception with its traceback in a
    ``CheckpointException``; the first wrapped one (this rank's, or the lowest rank's) is the cause."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = failures.get(next(iter(sorted(failures))))
        if isinstance(wrapped, tuple) and wrapped and isinstance(wrapped[0], BaseException):
            return describe_error(wrapped[0])
    text = (str(err).strip().splitlines() or [""])[0][:300] or type(err).__name__
    return text if isinstance(err, OSError) else f"{type(err).__name__}: {text}"


def _nbytes(state: dict[str, object]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
