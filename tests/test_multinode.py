"""`switchdit submit --nodes 2` on a real two-host Slurm cluster (see multinode_cluster.py).

One CPU rank per host, the demo model with its experts split over the two hosts (EP 2), gloo over
the bridge between the hosts' network namespaces. The tests run in order: the last one kills a
host for good.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multinode_cluster import MultiNodeSlurm, start_multinode_cluster
from slurm_cluster import (
    FINAL_STATES,
    JOB_TIMEOUT,
    SlurmUnavailable,
    batch_log,
    rank_log,
    read_jsonl,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"  # the demo model with a small batch
STEPS = 12
# Small enough that a silent peer is noticed in seconds here; real clusters keep the default.
TIMEOUT_S = 15


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> MultiNodeSlurm:
    try:
        c = start_multinode_cluster(tmp_path_factory.mktemp("multinode"))
    except SlurmUnavailable as err:
        pytest.skip(f"no two-host Slurm cluster: {err}")
    yield c
    c.stop()


def submit(cluster, run_dir: Path, digits: Path, *options: str, overrides=()) -> tuple[str, dict, str]:
    """`switchdit submit` of a two-host job; returns (job id, printed paths, stderr)."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("SWITCHDIT_")}
    # A lost host leaves srun waiting; the batch script gives up on it after this long.
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", SWITCHDIT_SRUN_GRACE_SECONDS="10")
    argv = [
        "submit", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1",
        "--time", "10", "--signal-seconds", "60", "--run-dir", str(run_dir), *options,
        f"data.shards={digits}", f"train.steps={STEPS}", f"parallel.timeout_s={TIMEOUT_S}", *overrides,
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "switchdit_dist.cli", *argv], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"^submitted job (\d+)", out.stdout, re.M)[1]
    return job_id, dict(re.findall(r"^\s+([a-z ]+):\s+(\S+)$", out.stdout, re.M)), out.stderr


def wait_stepping(cluster, job_id: str, paths: dict, steps: int) -> None:
    metrics = Path(paths["metrics"])

    def stepping() -> bool:
        if cluster.job_state(job_id) in FINAL_STATES:
            raise AssertionError(f"job ended early:\n{batch_log(paths)}")
        return metrics.exists() and len(read_jsonl(metrics)) >= steps

    wait_until(stepping, JOB_TIMEOUT, f"{steps} training steps", interval=0.2)


def latest_step(run_dir: Path) -> int:
    checkpoints = run_dir / "checkpoints"
    newest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert (newest / "COMPLETE").exists()
    return json.loads((newest / "meta.json").read_text())["step"]


@pytest.fixture(scope="module")
def one_host_run(digits, tmp_path_factory) -> dict[int, float]:
    """The same config on one host with two local processes (torchrun): the reference losses."""
    run_dir = tmp_path_factory.mktemp("one-host") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWITCHDIT_", "SLURM_", "GLOO_"))}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    argv = ["launch", "--nproc", "2", "--", "train", "--config", str(TINY), "--run-dir", str(run_dir)]
    argv += [f"data.shards={digits}", f"train.steps={STEPS}"]
    out = subprocess.run(
        [sys.executable, "-m", "switchdit_dist.cli", *argv], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def two_host_run(cluster, digits, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two-hosts") / "run"
    job_id, paths, stderr = submit(cluster, run_dir, digits)
    return job_id, paths, stderr, cluster.wait_finished(job_id)


def test_two_hosts_with_experts_across_them_train_as_one_host_does(two_host_run, one_host_run):
    job_id, paths, stderr, state = two_host_run
    log = batch_log(paths)
    assert state == "COMPLETED", log
    assert "each expert-parallel group spans 2 nodes" in stderr  # warned, not refused
    # The rendezvous is the allocation's first host, and each host ran one rank.
    assert f"job {job_id} attempt 0" in log and "on node[1-2]" in log
    assert re.search(r"rendezvous node1:\d+,", log), log
    assert "ranks on hosts (rank:host): 0:node1 1:node2" in rank_log(paths, 0, 0).read_text()
    # Bit-identical: the same seeds, data order and reduction order (gloo's two-rank all-reduce
    # and all-to-all add and move the same values in the same order over loopback or a bridge).
    losses = {row["step"]: row["loss"] for row in read_jsonl(paths["metrics"])}
    assert losses == one_host_run


def test_early_warning_on_two_hosts_requeues_and_resumes_identically(cluster, digits, two_host_run, tmp_path):
    _, ref_paths, _, ref_state = two_host_run
    assert ref_state == "COMPLETED", batch_log(ref_paths)
    run_dir = tmp_path / "preempted"
    job_id, paths, _ = submit(cluster, run_dir, digits, overrides=("checkpoint.keep=100",))
    wait_stepping(cluster, job_id, paths, 2)
    cluster.run("scancel", "--signal=USR2", "--batch", job_id)
    state = cluster.wait_finished(job_id)
    assert state == "COMPLETED", batch_log(paths)
    assert cluster.job(job_id)["Restarts"] == "1"
    attempts = read_jsonl(paths["attempts"])
    assert [(a["restart_count"], a["outcome"], a["signal"], a["action"]) for a in attempts] == [
        (0, "checkpointed", "USR2", "requeue"),
        (1, "finished", "", "done"),
    ]
    # Both hosts wrote their part of the checkpoint the warning produced, and both resumed from it.
    resumed = int(re.search(r"resumed from step (\d+)", rank_log(paths, 1, 0).read_text())[1])
    assert 1 <= resumed < STEPS
    warned = run_dir / "checkpoints" / f"step_{resumed:08d}"
    assert (warned / "COMPLETE").exists()
    # Each rank writes its own DCP file, rank 1 from node2.
    assert sorted(p.name for p in warned.glob("__*_*.distcp"))[:1] == ["__0_0.distcp"]
    assert any(p.name.startswith("__1_") for p in warned.glob("*.distcp")), sorted(warned.iterdir())
    assert "ranks on hosts (rank:host): 0:node1 1:node2" in rank_log(paths, 1, 0).read_text()
    rows = read_jsonl(paths["metrics"])
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    reference = {row["step"]: row["loss"] for row in read_jsonl(ref_paths["metrics"])}
    after = {row["step"]: row["loss"] for row in rows if row["step"] > resumed}
    assert after == {step: reference[step] for step in range(resumed + 1, STEPS + 1)}


def train_pid(cluster: MultiNodeSlurm, host) -> int:
    """The trainer process running on ``host``."""

    def find() -> int | None:
        for pid in cluster.host_pids(host):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"train" in argv and any(b"switchdit" in a for a in argv) and b"bash" not in argv[0]:
                return pid
        return None

    wait_until(lambda: find() is not None, 30, f"the trainer on {host.name}")
    return find()


def test_a_stopped_rank_is_named_and_the_job_ends(cluster, digits, tmp_path):
    run_dir = tmp_path / "stopped"
    job_id, paths, _ = submit(cluster, run_dir, digits, overrides=("train.steps=100000",))
    wait_stepping(cluster, job_id, paths, 2)
    pid = train_pid(cluster, cluster.hosts[1])
    os.kill(pid, signal.SIGSTOP)  # alive but silent, as a rank stuck in the kernel or a frozen VM
    stopped_at = time.monotonic()
    state = cluster.wait_finished(job_id, timeout=TIMEOUT_S + 90)
    elapsed = time.monotonic() - stopped_at
    log = batch_log(paths)
    assert state == "FAILED", log
    assert elapsed < TIMEOUT_S + 60, f"the job took {elapsed:.0f} s to end after the rank stopped"
    assert "switchdit: FAILED: lost rank 1 on host node2 (noticed by rank 0): no heartbeat for" in log
    assert f"parallel.timeout_s={TIMEOUT_S}" in log
    rank0 = rank_log(paths, 0, 0).read_text()
    assert f"lost rank 1 (host node2, pid {pid})" in rank0
    (attempt,) = read_jsonl(paths["attempts"])
    assert (attempt["outcome"], attempt["failed_rank"], attempt["lost_host"], attempt["action"]) == (
        "failed",
        1,
        "node2",
        "stop",
    )


def test_a_host_that_dies_ends_the_job_and_the_run_resumes_on_one_host(cluster, digits, tmp_path):
    run_dir = tmp_path / "host-lost"
    job_id, paths, _ = submit(cluster, run_dir, digits, overrides=("train.steps=100000",))
    metrics = Path(paths["metrics"])

    def checkpointed_and_past_it() -> bool:
        if cluster.job_state(job_id) in FINAL_STATES:
            raise AssertionError(f"job ended early:\n{batch_log(paths)}")
        latest = run_dir / "checkpoints" / "latest"
        return latest.exists() and metrics.exists() and len(read_jsonl(metrics)) >= latest_step(run_dir) + 1

    wait_until(checkpointed_and_past_it, JOB_TIMEOUT, "a checkpoint and a step after it", interval=0.2)
    cluster.kill_host(cluster.hosts[1])  # slurmd, slurmstepd and the rank on node2
    killed_at = time.monotonic()
    attempts = Path(paths["attempts"])
    wait_until(attempts.exists, 90, "the batch script to record the attempt")
    elapsed = time.monotonic() - killed_at
    # The batch script ends within seconds; Slurm keeps the job COMPLETING until it has declared
    # the dead host DOWN (SlurmdTimeout), then it ends too, long before the 10-minute limit.
    state = cluster.wait_finished(job_id, timeout=180)
    log = batch_log(paths)
    assert state == "FAILED", log
    assert elapsed < 45, f"the batch script took {elapsed:.0f} s to end after the host died"
    assert "switchdit: FAILED: lost rank 1 on host node2" in log
    (attempt,) = read_jsonl(paths["attempts"])
    assert (attempt["outcome"], attempt["failed_rank"], attempt["lost_host"], attempt["action"]) == (
        "failed",
        1,
        "node2",
        "stop",
    )
    # `latest` names a complete checkpoint, and the run continues from it on the host that is left.
    kept = latest_step(run_dir)
    assert kept >= 3
    job2, paths2, _ = submit(
        cluster,
        run_dir,
        digits,
        "--nodes",
        "1",
        overrides=(f"train.steps={kept + 3}", "parallel.ep_size=1", "train.global_batch=8"),
    )
    state = cluster.wait_finished(job2)
    assert state == "COMPLETED", batch_log(paths2)
    first = rank_log(paths2, 0, 0).read_text()
    assert f"resumed from step {kept}" in first
    assert "resharded" in first and "written by 2 process(es) with parallel.ep_size=2" in first
    assert latest_step(run_dir) == kept + 3
