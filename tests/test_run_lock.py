"""The run-directory lock with real processes: one holder, the refusal names it, a killed holder
(kill -9) never blocks, a live rank of an earlier job does, and an unwritable directory is named."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from switchdit_dist.errors import UserError
from switchdit_dist.train import run_lock
from switchdit_dist.train.run_lock import RunLock

HOLD = """
import sys
from switchdit_dist.train.run_lock import RunLock
lock = getattr(RunLock, sys.argv[2])(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills this process)
lock.release()
"""


def hold(run_dir: Path, how: str = "acquire", env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def test_a_second_job_is_refused_with_the_holder_named(tmp_path):
    holder = hold(tmp_path, env={"SLURM_JOB_ID": "4242"})
    try:
        with pytest.raises(UserError) as refused:
            RunLock.acquire(tmp_path)
        text = str(refused.value)
        assert f"run directory {tmp_path} is in use by another job" in text
        assert f"host {socket.gethostname()}" in text and f"pid {holder.pid}" in text
        assert "Slurm job 4242" in text and "started 20" in text
        with pytest.raises(UserError, match="in use by another job"):
            run_lock.check_free(tmp_path)  # the launcher's check, before any rank starts
    finally:
        release(holder)
    # released: the next job takes it, and no stale holder record is left behind
    assert (tmp_path / ".lock").read_text() == ""
    RunLock.acquire(tmp_path).release()


def test_the_lock_of_a_killed_job_does_not_block(tmp_path):
    holder = hold(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    run_lock.check_free(tmp_path)
    lock = RunLock.acquire(tmp_path)
    info = json.loads((tmp_path / ".lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    lock.release()


def test_a_live_rank_of_an_earlier_job_blocks_the_next_job(tmp_path):
    """Rank 0 of a job was killed, another of its ranks still runs (and may still write)."""
    rank0 = hold(tmp_path)
    rank1 = hold(tmp_path, "join")
    rank0.send_signal(signal.SIGKILL)
    rank0.wait(timeout=30)
    try:
        with pytest.raises(UserError, match="still used by ranks of an earlier job"):
            RunLock.acquire(tmp_path)
        with pytest.raises(UserError, match="still used by ranks of an earlier job"):
            run_lock.check_free(tmp_path)
    finally:
        release(rank1)
    RunLock.acquire(tmp_path).release()


def test_ranks_of_one_job_share_the_lock(tmp_path):
    lock = RunLock.acquire(tmp_path)
    other = hold(tmp_path, "join")  # another rank of the same job
    release(other)
    lock.release()


def test_a_filesystem_without_locks_is_named_with_the_way_out(tmp_path, monkeypatch):
    def no_locks(*args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "lockf", no_locks)
    with pytest.raises(UserError) as refused:
        RunLock.acquire(tmp_path)
    assert "does not support POSIX locks" in str(refused.value) and run_lock.NO_LOCK_ENV in str(refused.value)
    monkeypatch.setenv(run_lock.NO_LOCK_ENV, "1")
    RunLock.acquire(tmp_path).release()


def read_only(folder: Path) -> list[str]:
    """A command prefix under which ``folder`` is read-only, also for root (whom permissions do
    not stop): a read-only bind mount in a private mount namespace."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if not shutil.which("unshare"):
        pytest.skip("running as root without unshare: no way to make a folder read-only")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not permitted here: {probe.stderr.decode().strip()}")
    mount = f'mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && exec "$@"'
    return ["unshare", "-m", "sh", "-c", mount, "sh"]


def test_a_read_only_run_directory_is_named(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = "from switchdit_dist.train.run_lock import check_writable; import sys; check_writable(sys.argv[1])"
    proc = subprocess.run(
        [*read_only(run_dir), sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert f"--run-dir {run_dir}: cannot write in {run_dir}" in proc.stderr
    run_dir.chmod(0o755)
    run_lock.check_writable(run_dir / "new" / "deeper")  # created when missing
    assert (run_dir / "new" / "deeper").is_dir() and not list((run_dir / "new" / "deeper").iterdir())
