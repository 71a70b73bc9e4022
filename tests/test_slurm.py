"""`switchdit submit` and the batch script against a real single-node Slurm started for the session.

The jobs run the real trainer (`switchdit train`, two CPU ranks over gloo) on the tiny config and
the digits shards. The early-warning test compares its losses with the uninterrupted job's.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import (
    FINAL_STATES,
    JOB_TIMEOUT,
    LocalSlurm,
    SlurmUnavailable,
    batch_log,
    rank_log,
    read_jsonl,
    start_cluster,
    wait_until,
)

from switchdit_dist import cli
from switchdit_dist.launch.slurm import log_paths as slurm_log_paths

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 16  # long enough that the early warning lands mid-run even on a busy machine


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> LocalSlurm:
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as err:
        pytest.skip(f"no local Slurm: {err}")
    yield cluster
    cluster.stop()


def job_env(slurm: LocalSlurm, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in slurm.env.items() if not k.startswith("SWITCHDIT_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    return env


def submit_args(run_dir: Path, digits: Path, *options: str, overrides: tuple[str, ...] = ()) -> list[str]:
    """Arguments for a two-rank CPU job; later ``options`` win over the defaults listed first."""
    return [
        "submit",
        "--config",
        str(TINY),
        "--nodes",
        "1",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        "--time",
        "10",
        "--signal-seconds",
        "60",
        "--run-dir",
        str(run_dir),
        *options,
        f"data.shards={digits}",
        f"train.steps={STEPS}",
        *overrides,
    ]


def submit(slurm: LocalSlurm, run_dir: Path, digits: Path, *extra: str, env: dict | None = None):
    """Run `switchdit submit`; returns (job id, {label: path}) as printed."""
    out = subprocess.run(
        [sys.executable, "-m", "switchdit_dist.cli", *submit_args(run_dir, digits, *extra)],
        env=env or job_env(slurm),
        capture_output=True,
        text=True,
        cwd=run_dir.parent,
    )
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"^submitted job (\d+)", out.stdout, re.M)[1]
    paths = dict(re.findall(r"^\s+([a-z ]+):\s+(\S+)$", out.stdout, re.M))
    return job_id, paths


@pytest.fixture(scope="session")
def reference_run(slurm, digits, tmp_path_factory):
    """An uninterrupted two-rank job of the tiny config: the baseline other tests compare with."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    job_id, paths = submit(slurm, run_dir, digits)
    state = slurm.wait_finished(job_id)
    return job_id, paths, state


# --- before anything is submitted ----------------------------------------------------------------


def test_dry_run_prints_a_valid_script_with_the_signal_request(slurm, digits, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(submit_args(run_dir, digits, "--dry-run", "--partition", "debug")) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/bin/bash\n")
    assert "#SBATCH --signal=B:USR2@60\n" in script
    assert "#SBATCH --requeue\n" in script
    assert "#SBATCH --ntasks-per-node=2\n" in script
    assert "#SBATCH --partition=debug\n" in script
    assert not [line for line in script.splitlines() if line.startswith("#SBATCH --gpu")]  # CPU ranks
    assert "--kill-on-bad-exit=1" in script
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # The script's header must also be acceptable to sbatch itself: --test-only validates
    # without queueing anything.
    header = script.replace(f"--output={run_dir}/logs/", "--output=/tmp/")
    test_only = slurm.run("sbatch", "--test-only", input=header, check=False)
    assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr
    assert not run_dir.exists(), "a dry run must write nothing"
    assert slurm.queued_jobs() == []


@pytest.mark.parametrize(
    "options, overrides, expected",
    [
        (["--time", "1:2:3:4"], [], "--time '1:2:3:4': expected a Slurm time limit"),
        (["--nodes", "0"], [], "--nodes must be >= 1, got 0"),
        (["--time", "1", "--signal-seconds", "120"], [], "--signal-seconds 120 is not shorter than --time 1"),
        (
            ["--tasks-per-node", "3", "--nodes", "2"],
            ["train.global_batch=48"],
            "3 ranks per node is not a multiple of parallel.ep_size=2",
        ),
        (["--tasks-per-node", "3"], [], "parallel.ep_size=2 does not divide the world size 3"),
        (["--gpus-per-node", "2", "--tasks-per-node", "4"], [], "a GPU job runs one rank per GPU"),
        (["--max-requeues", "-1"], [], "--max-requeues must be >= 0"),
        ([], ["train.stepz=3"], "unknown config key 'train.stepz'"),
        ([], ["data.shards=/nonexistent/manifest.json"], "/nonexistent/manifest.json"),
    ],
)
def test_bad_arguments_fail_before_submitting(
    slurm, digits, tmp_path, capsys, monkeypatch, options, overrides, expected
):
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)  # a working sbatch is on PATH: nothing may reach it
    run_dir = tmp_path / "run"
    assert cli.main(submit_args(run_dir, digits, *options, overrides=tuple(overrides))) == 2
    err = capsys.readouterr().err
    assert err.startswith("switchdit submit: error: ")
    assert expected in err
    assert "Traceback" not in err
    assert not run_dir.exists()
    assert slurm.queued_jobs() == []


# --- real jobs -----------------------------------------------------------------------------------


def test_job_runs_to_completion_where_the_output_said(reference_run):
    job_id, paths, state = reference_run
    assert state == "COMPLETED", batch_log(paths)
    run_dir = Path(paths["checkpoints"]).parent
    assert Path(paths["script"]) == run_dir / "job.sbatch" and Path(paths["script"]).is_file()
    assert Path(paths["config"]).is_file()
    steps = [row["step"] for row in read_jsonl(paths["metrics"])]
    assert steps == list(range(1, STEPS + 1))
    checkpoints = Path(paths["checkpoints"])
    newest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert (newest / "COMPLETE").exists()
    assert json.loads((newest / "meta.json").read_text())["step"] == STEPS
    attempts = read_jsonl(paths["attempts"])
    assert [(a["job_id"], a["restart_count"], a["outcome"], a["action"]) for a in attempts] == [
        (job_id, 0, "finished", "done")
    ]
    rank_logs = rank_log(paths, 0, 0).parent
    assert sorted(p.name for p in rank_logs.glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
    assert f"training finished at step {STEPS}" in (rank_logs / "rank-0.log").read_text()
    assert "switchdit: training finished (attempt 0)" in batch_log(paths)


def test_early_warning_checkpoints_requeues_and_resumes_identically(slurm, digits, reference_run, tmp_path):
    _, ref_paths, ref_state = reference_run
    assert ref_state == "COMPLETED", batch_log(ref_paths)
    run_dir = tmp_path / "preempted"
    job_id, paths = submit(slurm, run_dir, digits)
    metrics = Path(paths["metrics"])

    # Warn once the trainer is stepping (its signal handlers are installed before step 1).
    def stepping() -> bool:
        if slurm.job_state(job_id) in FINAL_STATES:
            raise AssertionError(f"job ended before the warning:\n{batch_log(paths)}")
        return metrics.exists() and len(read_jsonl(metrics)) >= 2

    wait_until(stepping, JOB_TIMEOUT, "the first training steps", interval=0.2)
    slurm.run("scancel", "--signal=USR2", "--batch", job_id)

    state = slurm.wait_finished(job_id)
    assert state == "COMPLETED", batch_log(paths)
    assert slurm.job(job_id)["Restarts"] == "1"

    attempts = read_jsonl(paths["attempts"])
    assert [(a["restart_count"], a["outcome"], a["signal"], a["action"]) for a in attempts] == [
        (0, "checkpointed", "USR2", "requeue"),
        (1, "finished", "", "done"),
    ]
    log = batch_log(paths)
    assert "batch shell received SIGUSR2, forwarding it to the ranks" in log
    assert "requeueing the job" in log

    # The second attempt resumed from the checkpoint the warning produced, mid-run.
    second = rank_log(paths, 1, 0).read_text()
    resumed = int(re.search(r"resumed from step (\d+)", second)[1])
    assert 1 <= resumed < STEPS

    # Exactly the configured number of optimizer steps, each logged once, and after the resume
    # the same losses as the uninterrupted run.
    rows = read_jsonl(metrics)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    reference = {row["step"]: row["loss"] for row in read_jsonl(ref_paths["metrics"])}
    after = {row["step"]: row["loss"] for row in rows if row["step"] > resumed}
    assert after == {step: reference[step] for step in range(resumed + 1, STEPS + 1)}
    checkpoints = Path(paths["checkpoints"])
    newest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert json.loads((newest / "meta.json").read_text())["step"] == STEPS


def test_resubmitting_with_another_layout_passes_the_pre_check(
    slurm, digits, reference_run, capsys, monkeypatch
):
    """One checkpoint format for every layout: four ranks instead of the checkpoint's two pass the
    resume pre-check (a dry run: nothing is written or queued). The pre-check's refusals (another
    architecture, a newer format) are tested without Slurm in test_checkpoint_format.py."""
    _, paths, state = reference_run
    assert state == "COMPLETED", batch_log(paths)
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    run_dir = Path(paths["checkpoints"]).parent
    script_before = (run_dir / "job.sbatch").read_text()
    argv = submit_args(run_dir, digits, "--nodes", "2", "--dry-run", overrides=("train.micro_batch=4",))
    assert cli.main(argv) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out
    assert (run_dir / "job.sbatch").read_text() == script_before
    assert slurm.queued_jobs() == []


# --- the batch script's bookkeeping, with a stand-in for the trainer --------------------------------
# These edit the rendered script by hand (as a user may) so that each rank runs a short shell
# command with a chosen outcome; the trainer's own side of the protocol is covered above.


def submit_with_stand_in(slurm, digits, capsys, run_dir: Path, command: str, *options: str):
    """Render the job script, make every rank run ``command`` and submit it with sbatch."""
    assert cli.main(submit_args(run_dir, digits, "--dry-run", *options)) == 0
    script = capsys.readouterr().out
    (train_line,) = [line for line in script.splitlines() if line.startswith("TRAIN=(")]
    script = script.replace(train_line, f"TRAIN=(bash -c {shlex.quote(command)})")
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "job.sbatch").write_text(script)
    job_id = slurm.run("sbatch", "--parsable", str(run_dir / "job.sbatch")).stdout.strip()
    return job_id, slurm_log_paths(run_dir, job_id)


def test_first_failing_rank_is_named_and_its_peers_are_stopped(slurm, digits, capsys, tmp_path):
    run_dir = tmp_path / "failing"
    # Rank 1 fails; rank 0 would wait forever, as a rank stuck in a collective does.
    command = 'if [ "$RANK" = 1 ]; then echo "rank 1: simulated failure" >&2; sleep 1; exit 7; fi; sleep 600'
    job_id, paths = submit_with_stand_in(slurm, digits, capsys, run_dir, command)
    state = slurm.wait_finished(job_id)
    log = batch_log(paths)
    assert state == "FAILED", log
    assert slurm.job(job_id)["Restarts"] == "0"
    rank1_log = run_dir / "logs" / f"{job_id}.0" / "rank-1.log"
    assert f"switchdit: FAILED: rank 1 failed first (exit code 7); its log is {rank1_log}" in log
    assert "rank 1: simulated failure" in log  # the end of the failing rank's log is shown
    attempts = read_jsonl(paths["attempts"])
    assert [(a["outcome"], a["failed_rank"], a["exit_code"], a["action"]) for a in attempts] == [
        ("failed", 1, 7, "stop")
    ]


def test_requeues_stop_at_the_configured_maximum(slurm, digits, capsys, tmp_path):
    run_dir = tmp_path / "limited"
    # Every attempt "checkpoints" (exit 3): one requeue is allowed, the second attempt must stop.
    job_id, paths = submit_with_stand_in(
        slurm, digits, capsys, run_dir, "sleep 1; exit 3", "--max-requeues", "1"
    )
    state = slurm.wait_finished(job_id)
    log = batch_log(paths)
    assert state == "FAILED", log  # exit code 3: checkpointed but not finished
    assert slurm.job(job_id)["Restarts"] == "1"
    assert "already requeued 1 times (--max-requeues 1)" in log
    attempts = read_jsonl(paths["attempts"])
    assert [(a["restart_count"], a["outcome"], a["exit_code"], a["action"]) for a in attempts] == [
        (0, "checkpointed", 3, "requeue"),
        (1, "checkpointed", 3, "stop"),
    ]
