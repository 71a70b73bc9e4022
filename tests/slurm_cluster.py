"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd in a temporary directory.

Everything the daemons write (keys, sockets, state, logs) lives under one directory and every
client finds the cluster through ``SLURM_CONF``, so nothing on the host is changed besides the
Debian packages, which are installed when missing. Daemons run in the foreground as children of
the test process and are stopped by PID.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from switchdit_dist.train.distributed import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
INSTALL_LOCK = "/tmp/switchdit-tests-slurm-install.lock"
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "munged"]
# munged and slurmctld/slurmd live in /usr/sbin, which is not always on a test runner's PATH.
SBIN_DIRS = ["/usr/sbin", "/sbin", "/usr/local/sbin"]


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed here (no apt, not root): tests should skip with this message."""


def _find(binary: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(binary, path=path)


def ensure_installed() -> None:
    """Install Debian's Slurm and munge packages when a binary is missing.

    Raises SlurmUnavailable when installing is impossible here (no apt-get, not root), and
    RuntimeError when apt-get itself fails (a broken install must fail the tests, not skip them).
    """
    if not _missing():
        return
    # Test processes that run side by side (pytest -n) would race for dpkg's lock: one installs,
    # the others wait for it and find the binaries there.
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _missing():
            _install(_missing())


def _missing() -> list[str]:
    return [b for b in BINARIES + ["mungekey"] if _find(b) is None]


def _install(missing: list[str]) -> None:
    apt = shutil.which("apt-get")
    if apt is None:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and apt-get is not available")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and installing them needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "--no-install-recommends", *PACKAGES]
    first = subprocess.run(install, env=env, capture_output=True, text=True)
    if first.returncode != 0:
        # A fresh image often has no package lists yet.
        subprocess.run([apt, "update"], env=env, capture_output=True, text=True, check=False)
        second = subprocess.run(install, env=env, capture_output=True, text=True)
        if second.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{second.stderr[-2000:]}")
    still_missing = [b for b in BINARIES if _find(b) is None]
    if still_missing:
        raise RuntimeError(f"after installing {PACKAGES}, binaries {still_missing} are still missing")


def node_name() -> str:
    """The short host name when it resolves (jobs use node names as rendezvous addresses)."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        return "localhost"
    return name


def total_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# Bounds, not delays: a passing job takes well under a minute; a loaded machine may take minutes.
JOB_TIMEOUT = 600
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


def read_jsonl(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def batch_log(paths: dict[str, str]) -> str:
    """The batch log named in `switchdit submit`'s output."""
    log = Path(paths["batch log"])
    return log.read_text() if log.exists() else "(no batch log)"


def rank_log(paths: dict[str, str], attempt: int, rank: int) -> Path:
    return Path(paths["rank logs"].replace("<attempt>", str(attempt)).replace("<rank>", str(rank)))


@dataclass
class LocalSlurm:
    """A running single-node cluster. ``env`` is what a client process needs to reach it."""

    root: Path
    node: str
    cpus: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    # -- clients --------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, check=check, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """Fields of ``scontrol show job`` (empty once the controller has forgotten the job)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if out.returncode != 0:
            return {}
        fields = {}
        for token in out.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def job_state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> str:
        seen: list[str] = []

        def reached() -> bool:
            state = self.job_state(job_id)
            if not seen or seen[-1] != state:
                seen.append(state)
            return state in states

        try:
            wait_until(reached, timeout, f"job {job_id} to reach {sorted(states)}", interval=0.5)
        except TimeoutError as err:
            raise TimeoutError(f"{err}; states seen: {seen}\n{self.describe(job_id)}") from None
        return seen[-1]

    def wait_finished(self, job_id: str, timeout: float = JOB_TIMEOUT) -> str:
        """Wait for the job to end; returns its final state.

        A requeued attempt is not started by hand: Slurm holds it until its begin time (requeue
        time plus the credential lifetime, ``cred_expire``), and a start forced earlier is killed
        by slurmctld as "non-startable: Job credential revoked". With the test clusters' short
        ``cred_expire`` the wait is a few seconds.
        """
        seen: list[str] = []

        def done() -> bool:
            seen.append(self.job_state(job_id))
            return seen[-1] in FINAL_STATES

        try:
            wait_until(done, timeout, f"job {job_id} to end", interval=0.5)
        except TimeoutError as err:
            raise AssertionError(f"{err}; states seen {sorted(set(seen))}\n{self.describe(job_id)}") from None
        return seen[-1]

    def describe(self, job_id: str) -> str:
        """Job record and the tail of the daemon logs, for assertion messages."""
        parts = [self.run("scontrol", "show", "job", job_id, check=False).stdout]
        for log in sorted((self.root / "log").glob("slurm*.log")):
            parts.append(f"--- {log.name} (tail) ---\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def queued_jobs(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i", check=False)
        return out.stdout.split() if out.returncode == 0 else []

    # -- lifecycle ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, wait for the queue to drain, then stop the daemons by PID.

        Order matters: slurmstepd and job processes outlive slurmd when it goes first.
        """
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            jobs = self.queued_jobs()
            if jobs:
                self.run("scancel", *jobs, check=False)
                try:
                    wait_until(lambda: not self.queued_jobs(), 60, "the queue to empty")
                except TimeoutError:
                    pass  # still stop the daemons below
        slurmds = [name for name in self.processes if name.startswith("slurmd")]
        for name in [*slurmds, "slurmctld", "munged"]:
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def slurm_conf_text(
    root: Path,
    ctld_host: str,
    ctld_addr: str,
    ctld_port: int,
    slurmd_port: int,
    socket: Path,
    node_lines: str,
    slurmd_paths: str = "slurmd",
    extra: str = "",
) -> str:
    """The settings every test cluster shares; ``node_lines`` describe its nodes and
    ``slurmd_paths`` names slurmd's spool, pid and log files (``%n`` is the node name)."""
    spool = f"{root}/spool" if slurmd_paths == "slurmd" else f"{root}/spool/%n"
    return f"""\
# Test cluster; every path lives under {root}.
ClusterName=switchdit-test
SlurmctldHost={ctld_host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A short credential lifetime lets a requeued job start again after seconds, not minutes.
AuthInfo=socket={socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/{slurmd_paths}.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/{slurmd_paths}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=1
KillWait=10
SlurmdParameters=config_overrides
{extra}{node_lines}
"""


def write_slurm_conf(
    root: Path, node: str, cpus: int, ctld_port: int, slurmd_port: int, socket: Path
) -> Path:
    conf = root / "slurm.conf"
    memory = int(total_memory_mb() * 0.9)
    nodes = (
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN\n"
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    )
    conf.write_text(slurm_conf_text(root, node, "127.0.0.1", ctld_port, slurmd_port, socket, nodes))
    return conf


def start_munge(root: Path) -> tuple[subprocess.Popen, Path]:
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)
    munge_dir.chmod(0o755)  # munged refuses a socket directory others cannot traverse
    key = munge_dir / "munge.key"
    subprocess.run([_find("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
    key.chmod(0o600)
    sock = munge_dir / "munge.socket"
    proc = subprocess.Popen(
        [
            _find("munged"),
            "-F",
            "--force",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--log-file={munge_dir / 'munged.log'}",
            f"--pid-file={munge_dir / 'munged.pid'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: sock.exists() or proc.poll() is not None, 20, "munged's socket")
    if proc.poll() is not None:
        raise RuntimeError(f"munged exited with {proc.returncode}: {(munge_dir / 'munged.log').read_text()}")
    return proc, sock


def start_cluster(root: Path) -> LocalSlurm:
    """Start munged, slurmctld and slurmd under ``root`` and wait until the node is idle."""
    ensure_installed()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
    node = node_name()
    # Two ranks need two CPUs; config_overrides keeps slurmd from draining a smaller machine.
    cpus = max(2, os.cpu_count() or 1)
    cluster = LocalSlurm(root=root, node=node, cpus=cpus, env={})
    try:
        cluster.processes["munged"], sock = start_munge(root)
        conf = write_slurm_conf(root, node, cpus, free_port(), free_port(), sock)
        path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
        cluster.env = dict(os.environ, SLURM_CONF=str(conf), PATH=path)
        for daemon in ("slurmctld", "slurmd"):
            argv = [_find(daemon), "-D"] + (["-N", node] if daemon == "slurmd" else [])
            cluster.processes[daemon] = subprocess.Popen(
                argv,
                env=cluster.env,
                stdout=open(root / "log" / f"{daemon}.stdout", "w"),
                stderr=subprocess.STDOUT,
            )

        def node_idle() -> bool:
            for daemon in ("slurmctld", "slurmd"):
                if cluster.processes[daemon].poll() is not None:
                    raise RuntimeError(f"{daemon} exited early; see {root / 'log'}")
            out = cluster.run("sinfo", "-h", "-o", "%T", check=False)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        wait_until(node_idle, 60, "the Slurm node to become idle")
    except BaseException:
        cluster.stop()
        raise
    return cluster
