"""A job's life on its run directory, with real `switchdit launch` processes (2 ranks, tiny config):
signals to the launcher stop every process with a resumable checkpoint and the ranks' exit code;
a kill -9 of the whole job leaves a lock that does not block and metrics without replayed steps;
two launches at once: one trains, the other names the holder; a refused and an accepted change of
settings on resume; bad values and a read-only run directory fail in one line before any rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_run_lock import read_only
from test_train import digits  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow
FAST = ("logging.gate_image_every=0", "logging.tensorboard=true")


def command(run_dir: Path, data: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "switchdit_dist.cli",
        "launch",
        "--nproc",
        "2",
        "--",
        "train",
        "--config",
        str(CONFIG),
        "--run-dir",
        str(run_dir),
        f"data.shards={data}",
        *FAST,
        *overrides,
    ]


class Launch:
    """One `switchdit launch` in the background, its output in a file."""

    def __init__(self, argv: list[str], log: Path, prefix: list[str] | None = None, fault: str = ""):
        self.log = log
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SWITCHDIT_INJECT_FAULT=fault)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [*(prefix or []), *argv], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait(self, timeout: float = 400) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def output(self) -> str:
        return self.log.read_text()


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl's step records (not the resume events), in file order."""
    file = run_dir / "metrics.jsonl"
    if not file.is_file():
        return []
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if "event" not in r]


def wait_for_step(run_dir: Path, step: int, launch: Launch, timeout: float = 400) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(run_dir)
        if steps and max(steps) >= step:
            return max(steps)
        ended = launch.proc.poll()
        assert ended is None, f"launch ended early ({ended}):\n{launch.output[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s:\n{launch.output[-3000:]}")


def processes_of(run_dir: Path) -> list[tuple[int, str]]:
    """Live processes whose command line names the run directory (launcher, agent, ranks)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(run_dir) in cmdline and state != "Z":
            found.append((int(entry), cmdline))
    return found


def latest(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])


def error_lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["term", "int"])
def test_a_signal_to_launch_checkpoints_stops_every_process_and_resumes(tmp_path, digits, sig, code):  # noqa: F811
    run = tmp_path / "run"
    argv = command(run, digits, "train.steps=500", "checkpoint.every=0")
    first = Launch(argv, tmp_path / "first.log")
    wait_for_step(run, 2, first)
    os.kill(first.proc.pid, sig)
    assert first.wait() == code, first.output[-3000:]
    assert f"stopping after step {latest(run)} on signal" in first.output
    assert processes_of(run) == []
    stopped = latest(run)
    assert max(logged_steps(run)) == stopped

    again = Launch(argv, tmp_path / "again.log")
    wait_for_step(run, stopped + 2, again)
    os.kill(again.proc.pid, sig)
    assert again.wait() == code, again.output[-3000:]
    assert f"resumed from step {stopped}" in again.output
    assert processes_of(run) == [] and latest(run) > stopped
    assert logged_steps(run) == list(range(1, latest(run) + 1))


def test_a_second_signal_stops_every_process_at_once(tmp_path, digits):  # noqa: F811
    run = tmp_path / "run"
    launch = Launch(command(run, digits, "train.steps=500", "checkpoint.every=0"), tmp_path / "launch.log")
    wait_for_step(run, 2, launch)
    os.kill(launch.proc.pid, signal.SIGHUP)  # a closed terminal: passed on as SIGTERM
    time.sleep(0.5)
    os.kill(launch.proc.pid, signal.SIGQUIT)
    assert launch.wait(timeout=60) in (128 + signal.SIGKILL, 143), launch.output[-3000:]
    assert "received SIGHUP: passing SIGTERM to the ranks" in launch.output
    assert "received SIGQUIT, a second signal: stopping the ranks now" in launch.output
    assert processes_of(run) == []


def test_after_a_kill9_of_launch_the_ranks_still_checkpoint_and_stop(tmp_path, digits):  # noqa: F811
    """As documented: the agent gets SIGTERM from the kernel when its launcher dies, and stops the
    ranks as if the launcher had passed the signal on."""
    run = tmp_path / "run"
    launch = Launch(command(run, digits, "train.steps=500", "checkpoint.every=0"), tmp_path / "launch.log")
    wait_for_step(run, 2, launch)
    os.kill(launch.proc.pid, signal.SIGKILL)
    launch.wait(timeout=30)
    deadline = time.monotonic() + 180
    while processes_of(run) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(run) == [], launch.output[-3000:]
    assert "stopping after step" in launch.output and latest(run) == max(logged_steps(run))


def test_kill9_of_a_whole_job_neither_blocks_the_next_nor_duplicates_steps(tmp_path, digits):  # noqa: F811
    run = tmp_path / "run"
    crashed = Launch(command(run, digits, "train.steps=500", "checkpoint.every=3"), tmp_path / "crashed.log")
    wait_for_step(run, 5, crashed)
    for pid, _ in processes_of(run):  # launcher, agent and ranks at once, as a lost node would
        os.kill(pid, signal.SIGKILL)
    crashed.wait(timeout=30)
    deadline = time.monotonic() + 30
    while processes_of(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of(run) == []
    resume_from, reached = latest(run), max(logged_steps(run))
    assert reached > resume_from  # steps that the resumed run replays

    resumed = Launch(
        command(run, digits, f"train.steps={reached + 2}", "checkpoint.every=3"), tmp_path / "resumed.log"
    )
    assert resumed.wait() == 0, resumed.output[-3000:]
    assert f"resumed from step {resume_from}" in resumed.output
    assert logged_steps(run) == list(range(1, reached + 3))  # each step once

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, reached + 3))


def test_two_launches_at_once_one_trains_and_the_other_names_the_holder(tmp_path, digits):  # noqa: F811
    run = tmp_path / "run"
    argv = command(run, digits, "train.steps=6", "checkpoint.every=3")
    both = [Launch(argv, tmp_path / "a.log"), Launch(argv, tmp_path / "b.log")]
    codes = [launch.wait() for launch in both]
    assert sorted(codes) == [0, 2], [launch.output[-3000:] for launch in both]
    winner, loser = both if codes[0] == 0 else both[::-1]
    refusals = error_lines(loser.output, f"run directory {run} is in use by another job")
    assert len(refusals) == 1, loser.output[-3000:]
    assert f"(host {socket.gethostname()}, pid " in refusals[0] and ", started 20" in refusals[0]
    assert "training finished at step 6" in winner.output
    assert logged_steps(run) == list(range(1, 7))  # the refused job wrote nothing

    # a change of meaning is refused in one line before any rank starts, the run left as it was
    refused = Launch(
        command(run, digits, "diffusion.noise_schedule=cosine", "diffusion.num_timesteps=500"),
        tmp_path / "refused.log",
    )
    assert refused.wait() == 2
    assert refused.output.strip().splitlines() == [
        f"switchdit launch: error: cannot resume {run} from step_00000006 with these changes: "
        "diffusion.num_timesteps: 1000 -> 500 (a different diffusion process); diffusion.noise_schedule: "
        "'linear' -> 'cosine' (a different diffusion process). They may not change on resume "
        f"(docs/checkpoints.md); restore the recorded values (see {run / 'config.yaml'}), or start a new "
        "run with them: the same command with another --run-dir"
    ]

    # an allowed change resumes, takes effect and is recorded
    accepted = Launch(command(run, digits, "train.steps=9", "optim.lr=0.0005"), tmp_path / "accepted.log")
    assert accepted.wait() == 0, accepted.output[-3000:]
    assert "resumed from step 6" in accepted.output
    assert "changed settings: optim.lr: 0.001 -> 0.0005, train.steps: 6 -> 9" in accepted.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if "event" not in r}
    assert sorted(lr) == list(range(1, 10)) and lr[6] == 0.001 and lr[7] == lr[9] == 0.0005
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 6]
    assert history[1]["changed"] == {"optim.lr": [0.001, 0.0005], "train.steps": [6, 9]}


def test_an_error_every_rank_hits_is_printed_once(tmp_path, digits):  # noqa: F811
    run = tmp_path / "run"
    argv = command(run, digits, "train.max_consecutive_nonfinite=1", "checkpoint.every=0")
    launch = Launch(argv, tmp_path / "nan.log", fault="nan@1:0,nan@2:1")
    assert launch.wait() == 2, launch.output[-3000:]
    lines = error_lines(launch.output, "consecutive steps (up to step 2) had a non-finite loss")
    assert len(lines) == 1 and lines[0].startswith("switchdit train: error: "), launch.output[-3000:]


def test_a_bad_value_and_a_read_only_run_dir_fail_in_one_line_before_any_rank(tmp_path, digits):  # noqa: F811
    run = tmp_path / "run"
    # the override before the options (argparse alone refused that)
    argv = command(run, digits)
    argv.insert(argv.index("train") + 1, "optim.lr=-1")
    bad = Launch(argv, tmp_path / "bad.log")
    assert bad.wait() == 2
    assert bad.output.splitlines() == ["switchdit launch: error: optim.lr: expected a number > 0, got -1.0"]

    run.mkdir()
    locked = Launch(command(run, digits), tmp_path / "ro.log", prefix=read_only(run))
    assert locked.wait() == 2
    assert locked.output.splitlines() == [
        f"switchdit launch: error: --run-dir {run}: cannot write in {run} (Read-only file system); "
        "choose a writable run directory"
    ] or (os.geteuid() != 0 and "Permission denied" in locked.output)


def test_missing_data_fails_in_one_line_before_any_rank(tmp_path):
    missing = tmp_path / "not-prepared" / "manifest.json"
    launch = Launch(command(tmp_path / "run", missing), tmp_path / "launch.log")
    assert launch.wait() == 2
    lines = launch.output.splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("switchdit launch: error: ") and str(missing) in lines[0]
    ), lines
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
