"""A really full disk: the run's checkpoint directory is a small tmpfs the test mounts (root), so
the writes fail where the kernel says, with whatever the writer raises there. Each failure is one
message naming the checkpoint, the cause, the space it needs and the space free; the partial
directory is removed; ``latest`` stays where it was; ``on_write_error=retry`` succeeds once space
is freed. Two processes, the tiny Switch-DiT (a checkpoint of about 15 MiB)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch_lifecycle import REPO, Launch, command, error_lines
from test_train import digits  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow
FAILED = "checkpoint write failed:"
SPACE = re.compile(r"needs up to ([\d.]+) MiB; ([\d.]+) MiB is free on ")


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)`` mounts a tmpfs of ``size`` at ``RUN/checkpoints`` and returns the run dir."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        run = tmp_path / "run"
        target = run / "checkpoints"
        target.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(target)
        return run

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=True)


def train(run: Path, data: Path, log: Path, *overrides: str) -> Launch:
    return Launch(command(run, data, "checkpoint.keep=1", *overrides), log)


def steps_present(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def verify(path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "switchdit_dist.cli", "verify", str(path)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def space(line: str) -> tuple[float, float]:
    """The MiB a failed save said it needs, and the MiB it said were free."""
    found = SPACE.search(line)
    assert found, line
    return float(found[1]), float(found[2])


def assert_one_clean_failure(output: str, step: int) -> str:
    failed = error_lines(output, FAILED)
    assert len(failed) == 1, output[-4000:]  # once for the job, not once per rank
    line = failed[0]
    assert f"step_{step:08d}: rank " in line and "the partial directory was removed" in line, line
    needed, free = space(line)
    assert needed > 14 and free < needed, line  # a checkpoint of this model: 14 MiB on disk
    assert "Traceback" not in output, output[-4000:]
    return line


def test_no_room_for_the_first_checkpoint_stops_with_one_message(tmp_path, digits, small_disk):  # noqa: F811
    run = small_disk("4m")
    launch = train(run, digits, tmp_path / "train.log")
    assert launch.wait() == 2, launch.output[-4000:]
    assert_one_clean_failure(launch.output, 3)
    assert "there is no complete checkpoint yet" in launch.output
    assert steps_present(run) == [] and not (run / "checkpoints" / "latest").exists()


def test_a_write_that_runs_out_midway_keeps_the_previous_checkpoint(tmp_path, digits, small_disk):  # noqa: F811
    # Room for one checkpoint and half of the next: the second one's data files fill the disk,
    # written in the background (asynchronous saves report at the next save or at the end).
    run = small_disk("22m")
    launch = train(run, digits, tmp_path / "train.log", "checkpoint.async=true")
    assert launch.wait() == 2, launch.output[-4000:]
    assert_one_clean_failure(launch.output, 6)
    assert "the latest complete checkpoint is still step 3" in launch.output
    assert steps_present(run) == ["step_00000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    checked = verify(run / "checkpoints" / "step_00000003")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_last_save_of_a_run_is_not_left_to_a_retry(tmp_path, digits, small_disk):  # noqa: F811
    run = small_disk("22m")  # the step-3 checkpoint fits, the step-6 one does not
    launch = train(run, digits, tmp_path / "train.log", "checkpoint.on_write_error=retry", "train.steps=6")
    assert launch.wait() == 2, launch.output[-4000:]
    assert_one_clean_failure(launch.output, 6)
    assert "checkpoint at step 6 could not be written" in launch.output
    assert "the latest complete checkpoint is still step 3" in launch.output
    assert steps_present(run) == ["step_00000003"]


def test_retry_succeeds_once_space_is_freed(tmp_path, digits, small_disk):  # noqa: F811
    run = small_disk("40m")  # room for two checkpoints: keep=1 prunes the old one after the new one
    filler = run / "checkpoints" / "filler"
    filler.write_bytes(b"\0" * (32 << 20))  # leaves 8 MiB: no checkpoint fits
    launch = train(run, digits, tmp_path / "train.log", "checkpoint.on_write_error=retry", "train.steps=30")
    deadline = time.monotonic() + 400
    while not error_lines(launch.output, FAILED):
        assert launch.proc.poll() is None, launch.output[-4000:]
        assert time.monotonic() < deadline, launch.output[-4000:]
        time.sleep(0.1)
    filler.unlink()  # the user frees space; the next interval's save finds it
    assert launch.wait() == 0, launch.output[-4000:]
    failed = error_lines(launch.output, FAILED)
    assert failed and all(space(line)[0] > 14 for line in failed), failed
    assert "Traceback" not in launch.output
    assert steps_present(run) == ["step_00000030"]  # the failed ones removed, keep=1 pruned the rest
    checked = verify(run / "checkpoints" / "step_00000030")
    assert checked.returncode == 0, checked.stdout + checked.stderr
