"""One job per run directory: a POSIX record lock on ``RUN_DIR/.lock`` held for the job's life.

Two byte ranges of the file carry the locks:

- byte 0, the *job* lock: taken exclusively by rank 0 (``acquire``). A second job's rank 0 (or
  ``switchdit launch`` checking before it starts any rank) finds it taken and stops with the
  holder's host, PID, Slurm job and start time, which rank 0 writes into the file;
- byte 1, the *writers* lock: shared by every rank of the job (rank 0 in ``acquire``, the others in
  ``join``). A new job also needs it exclusively for a moment, so it cannot start while any rank of
  an earlier job is still alive, e.g. one still writing its part of a checkpoint after its rank 0
  was killed. Afterwards rank 0 keeps it shared, like the others.

The kernel (and on NFS the server) drops a process's locks when it exits, however it exits, so a
lock never outlives its job: ``kill -9`` releases it at once, a dead NFSv4 client's locks expire
with its lease (about 90 s). POSIX (``fcntl``) locks rather than ``flock`` because they are what NFS
implements natively (Linux emulates ``flock`` with them there) and because they are not inherited
by forked children (data-loader workers), which could otherwise keep a dead job's lock.
Their one trap: a process loses its locks on a file when it closes *any* descriptor of that file,
so nothing in a rank opens ``.lock`` except this module, once. The file is never deleted: deleting
it while a job runs would let the next job lock a new file beside the old lock.

Filesystems: local ones, NFSv3 (with the lock daemon, i.e. not mounted ``nolock``) and NFSv4, and
Lustre mounted with ``-o flock`` lock across hosts. Lustre's ``localflock`` and NFS ``nolock`` only
lock within one host. A filesystem without locks is reported with ``NO_LOCK_ENV`` as the way out.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchdit_dist.errors import UserError

LOCK_NAME = ".lock"
NO_LOCK_ENV = "SWITCHDIT_NO_RUN_LOCK"  # "1": run without the lock (a filesystem without locks)
_JOB, _WRITERS = 0, 1  # the byte each lock covers
_BUSY = (errno.EACCES, errno.EAGAIN)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def disabled() -> bool:
    return os.environ.get(NO_LOCK_ENV, "") not in ("", "0")


def holder_info() -> dict[str, Any]:
    """Who this process is, as a refused job will report it."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return info


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "no holder recorded yet"
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job_id"):
        parts.append(f"Slurm job {info['slurm_job_id']}")
    parts.append(f"started {info.get('start', '?')}")
    return ", ".join(parts)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
    except OSError as err:
        raise UserError(f"cannot open the run directory's lock file {path}: {err.strerror}") from None


def _lock_error(path: Path, err: OSError) -> UserError:
    if err.errno in _UNSUPPORTED:
        return UserError(
            f"cannot lock {path}: {err.strerror}; this filesystem does not support POSIX locks "
            "(NFS: mount without 'nolock', with the lock daemon running; Lustre: mount with "
            f"'-o flock'). To train without the lock, set {NO_LOCK_ENV}=1 and make sure no other job "
            "uses this run directory"
        )
    return UserError(f"cannot lock {path}: {err.strerror}")


def _try(fd: int, path: Path, kind: int, byte: int) -> bool:
    """Take (or convert) the lock on one byte without waiting; False if another process holds it."""
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB, 1, byte)
        return True
    except OSError as err:
        if err.errno in _BUSY:
            return False
        raise _lock_error(path, err) from None


# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (native alignment, as the kernel's)
_FLOCK = "hhqqi"


def _held(fd: int, path: Path, byte: int) -> bool:
    """Whether another process holds a lock on one byte, without taking anything (F_GETLK), so
    that a launcher's look never makes a job starting at the same moment fail."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError as err:
        raise _lock_error(path, err) from None
    return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK


def _read_info(fd: int) -> dict[str, Any] | None:
    # The holder writes its record right after locking: give a job that just won a moment.
    for _ in range(10):
        raw = os.pread(fd, 4096, 0)
        try:
            info = json.loads(raw.decode())
            if isinstance(info, dict):
                return info
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    return None


def _in_use(fd: int, path: Path, run_dir: Path) -> UserError:
    return UserError(
        f"run directory {run_dir} is in use by another job ({describe(_read_info(fd))}; lock {path}): "
        "wait for it to end or stop it, or use another --run-dir"
    )


def _still_used(fd: int, path: Path, run_dir: Path) -> UserError:
    return UserError(
        f"run directory {run_dir} is still used by ranks of an earlier job (its rank 0 has ended; last "
        f"holder: {describe(_read_info(fd))}; lock {path}): they stop on their own or when their "
        "launcher ends them; try again then, or use another --run-dir"
    )


def _claim(fd: int, path: Path, run_dir: Path) -> None:
    """Take the job lock and make sure no earlier job's rank is alive; raises if either fails."""
    if not _try(fd, path, fcntl.LOCK_EX, _JOB):
        raise _in_use(fd, path, run_dir)
    if not _try(fd, path, fcntl.LOCK_EX, _WRITERS):
        raise _still_used(fd, path, run_dir)


def check_free(run_dir: Path) -> None:
    """Refuse now if a job holds ``run_dir`` (for launchers, before any rank starts); takes nothing."""
    path = lock_path(run_dir)
    if disabled() or not Path(run_dir).is_dir():
        return
    fd = _open(path)
    try:
        if _held(fd, path, _JOB):
            raise _in_use(fd, path, Path(run_dir))
        if _held(fd, path, _WRITERS):
            raise _still_used(fd, path, Path(run_dir))
    finally:
        os.close(fd)


@dataclass
class RunLock:
    """A held lock; the descriptor stays open until ``release`` or the end of the process."""

    path: Path
    fd: int | None
    owner: bool  # rank 0: holds the job lock and the holder record

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Rank 0: take the job lock for ``run_dir`` (which must exist) or raise UserError."""
        path = lock_path(run_dir)
        if disabled():
            return cls(path, None, owner=True)
        fd = _open(path)
        try:
            _claim(fd, path, Path(run_dir))
            _try(fd, path, fcntl.LOCK_SH, _WRITERS)  # a conversion: never refused
            record = json.dumps(holder_info()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            os.fsync(fd)  # other hosts read it through the shared filesystem
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, owner=True)

    @classmethod
    def join(cls, run_dir: Path, wait_s: float = 10.0) -> RunLock:
        """Another rank of the job that holds the lock: share the writers lock.

        Only a new job's rank 0 checking for live ranks holds it exclusively, for an instant.
        """
        path = lock_path(run_dir)
        if disabled():
            return cls(path, None, owner=False)
        Path(run_dir).mkdir(parents=True, exist_ok=True)  # (a fresh look on a shared filesystem)
        fd = _open(path)
        deadline = time.monotonic() + wait_s
        while not _try(fd, path, fcntl.LOCK_SH, _WRITERS):
            if time.monotonic() > deadline:
                os.close(fd)
                raise UserError(f"cannot take the shared lock of {path}: another process keeps it")
            time.sleep(0.05)
        return cls(path, fd, owner=False)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.owner:
                os.ftruncate(self.fd, 0)  # no stale holder record for the next reader
        except OSError:
            pass
        os.close(self.fd)  # closing drops the locks
        self.fd = None


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and prove that files can be created in it (and in its
    checkpoints folder, when there is one), or raise one UserError naming the folder."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--run-dir {run_dir}: cannot create it ({err.strerror})") from None
    folders = [run_dir] + [p for p in (run_dir / "checkpoints",) if p.is_dir()]
    for folder in folders:
        probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise UserError(
                f"--run-dir {run_dir}: cannot write in {folder} ({err.strerror}); "
                "choose a writable run directory"
            ) from None
