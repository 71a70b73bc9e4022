"""``switchdit submit``: render the SLURM batch script for a training run and submit it.

The script comes from the readable template ``templates/slurm.sbatch.tmpl`` next to this module
(package data, so a wheel install has it; ``launchers/`` in a checkout links to it; ``--template``
takes a site's own copy) and is stored in the run directory together with the resolved config it
trains with, so that a requeued attempt (or a user resubmitting by hand) runs exactly what was
submitted. Every argument and the config's parallel layout are checked before anything reaches
``sbatch``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from switchdit_dist.errors import UserError
from switchdit_dist.parallel_dims import ParallelDims

if TYPE_CHECKING:  # the config module imports torch; `switchdit submit --help` should not
    from switchdit_dist.config import Config

# Shipped inside the package so that a wheel install finds it; launchers/ links to it for readers.
TEMPLATE = Path(__file__).resolve().parent / "templates" / "slurm.sbatch.tmpl"
SCRIPT_NAME = "job.sbatch"
CONFIG_NAME = "job-config.yaml"  # the trainer writes its own config.yaml; this is what was submitted
MAX_SIGNAL_SECONDS = 65535  # Slurm stores the --signal time in 16 bits
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# Characters #SBATCH lines cannot carry: Slurm does not unquote directive values.
_UNSAFE = re.compile(r"[\s'\"\\$`]")


@dataclass
class SubmitConfig:
    """One ``switchdit submit`` invocation, validated by :func:`check_submit_config`."""

    config: Path
    nodes: int = 1
    gpus_per_node: int = 1  # 0 = CPU ranks
    tasks_per_node: int | None = None  # ranks per node; defaults to gpus_per_node (1 for CPU ranks)
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    job_name: str | None = None
    run_dir: Path | None = None
    max_requeues: int = 3
    signal_seconds: int = 300
    overrides: list[str] = field(default_factory=list)
    template: Path = TEMPLATE

    @property
    def ranks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def resolved_job_name(self) -> str:
        return self.job_name if self.job_name is not None else f"switchdit-{self.config.stem}"

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


# --- argument checks ---------------------------------------------------------------------------

_TIME_FORMATS = [
    # Slurm's --time forms; the value is the number of seconds.
    (re.compile(r"^(\d+)$"), lambda m: int(m[1]) * 60),
    (re.compile(r"^(\d+):(\d{1,2})$"), lambda m: int(m[1]) * 60 + int(m[2])),
    (re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})$"), lambda m: int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])),
    (re.compile(r"^(\d+)-(\d{1,2})$"), lambda m: int(m[1]) * 86400 + int(m[2]) * 3600),
    (
        re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2})$"),
        lambda m: int(m[1]) * 86400 + int(m[2]) * 3600 + int(m[3]) * 60,
    ),
    (
        re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2}):(\d{1,2})$"),
        lambda m: int(m[1]) * 86400 + int(m[2]) * 3600 + int(m[3]) * 60 + int(m[4]),
    ),
]


def parse_time_limit(text: str) -> int | None:
    """Seconds in a Slurm ``--time`` value; None for UNLIMITED/INFINITE. Raises UserError otherwise."""
    value = text.strip()
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    for pattern, to_seconds in _TIME_FORMATS:
        match = pattern.match(value)
        if match:
            seconds = to_seconds(match)
            if seconds <= 0:
                raise UserError(f"--time {text!r}: the time limit must be longer than zero")
            return seconds
    raise UserError(
        f"--time {text!r}: expected a Slurm time limit: MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, "
        "DAYS-HOURS, DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS (e.g. 30, 4:00:00, 2-00:00:00)"
    )


def _check_path(path: Path, what: str) -> None:
    if _UNSAFE.search(str(path)):
        raise UserError(
            f"{what} {str(path)!r}: #SBATCH lines cannot hold spaces, quotes, '$' or '\\' in a path"
        )


def _check_token(value: str | None, option: str) -> None:
    if value is not None and (not value or _UNSAFE.search(value)):
        raise UserError(f"{option} {value!r}: expected a non-empty value without spaces, quotes, '$' or '\\'")


def check_submit_config(sub: SubmitConfig) -> Config:
    """Validate arguments and the config's layout; returns the loaded config."""
    from switchdit_dist.config import load_config, validate
    from switchdit_dist.data.config import validate as validate_data

    if sub.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {sub.nodes}")
    if sub.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be >= 0 (0 = CPU ranks), got {sub.gpus_per_node}")
    if sub.tasks_per_node is not None:
        if sub.tasks_per_node < 1:
            raise UserError(f"--tasks-per-node must be >= 1, got {sub.tasks_per_node}")
        if sub.gpus_per_node > 0 and sub.tasks_per_node != sub.gpus_per_node:
            raise UserError(
                f"--tasks-per-node {sub.tasks_per_node} with --gpus-per-node {sub.gpus_per_node}: "
                "a GPU job runs one rank per GPU; --tasks-per-node is for CPU ranks (--gpus-per-node 0)"
            )
    if sub.cpus_per_task is not None and sub.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be >= 1, got {sub.cpus_per_task}")
    if sub.max_requeues < 0:
        raise UserError(f"--max-requeues must be >= 0, got {sub.max_requeues}")
    if not 1 <= sub.signal_seconds <= MAX_SIGNAL_SECONDS:
        raise UserError(
            f"--signal-seconds must be between 1 and {MAX_SIGNAL_SECONDS}, got {sub.signal_seconds}"
        )
    if sub.time is not None:
        limit = parse_time_limit(sub.time)
        if limit is not None and sub.signal_seconds >= limit:
            raise UserError(
                f"--signal-seconds {sub.signal_seconds} is not shorter than --time {sub.time} ({limit} s): "
                "the early warning would come before the job starts training"
            )
    for value, option in [
        (sub.partition, "--partition"),
        (sub.account, "--account"),
        (sub.qos, "--qos"),
        (sub.constraint, "--constraint"),
        (sub.resolved_job_name, "--job-name"),
    ]:
        _check_token(value, option)
    _check_path(Path.cwd(), "the current directory")
    if sub.run_dir is not None:
        _check_path(sub.run_dir.absolute(), "--run-dir")

    config = load_config(sub.config, sub.overrides)
    validate(config, sub.world_size, check_data=False)
    # Expert-parallel groups are consecutive ranks: inside one node their all-to-all costs
    # milliseconds, across nodes it can cost more than the step's compute (see `switchdit plan`).
    warning = ParallelDims.from_config(config, sub.world_size).check_nodes(sub.ranks_per_node)
    if warning:
        print(f"switchdit submit: warning: {warning}", file=sys.stderr)
    # The shards are read from the same (shared) filesystem by the job: missing ones fail here.
    validate_data(config.data)
    return config


def check_resume_layout(run_dir: Path, config: Config, world_size: int) -> None:
    """A run directory with a checkpoint resumes from it: its format must be one this version
    reads, and its model architecture the config's (loss settings may change). Any layout resumes
    any other (number of ranks, ``parallel.ep_size``, ZeRO stage), so the layout is not checked.

    The trainer refuses a mismatch too, but only after the job has waited in the queue.
    """
    from switchdit_dist.checkpoint.schema import CheckpointMeta
    from switchdit_dist.checkpoint.store import find_resume_point

    checkpoint = find_resume_point(run_dir / "checkpoints")
    if checkpoint is None:
        return
    meta = CheckpointMeta.read(checkpoint)
    meta.check_model(vars(config.model), f"--run-dir {run_dir}: checkpoint {checkpoint.name}")


# --- rendering ---------------------------------------------------------------------------------


def default_run_dir(config_path: Path) -> Path:
    return Path("runs") / f"{config_path.stem}-{datetime.now():%Y%m%d-%H%M%S}"


def render_template(template: str, values: dict[str, str], source: str = "template") -> str:
    """Fill ``{{ name }}`` placeholders. A line holding only a placeholder whose value is empty is
    dropped, so optional #SBATCH blocks leave no gap in the header."""
    names = set(_PLACEHOLDER.findall(template))
    missing = names - values.keys()
    if missing:
        raise UserError(f"{source}: no value for placeholder(s) {sorted(missing)}; known: {sorted(values)}")
    lines = []
    for line in template.splitlines(keepends=True):
        whole = _PLACEHOLDER.fullmatch(line.strip())
        if whole and not values[whole[1]]:
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: values[m[1]], line))
    return "".join(lines)


def train_command(run_dir: Path) -> list[str]:
    # The submitting interpreter: the job runs in the same environment (it must be on a shared
    # filesystem, like the run directory).
    return [
        sys.executable,
        "-m",
        "switchdit_dist.cli",
        "train",
        "--config",
        str(run_dir / CONFIG_NAME),
        "--run-dir",
        str(run_dir),
    ]


def render_script(sub: SubmitConfig, run_dir: Path) -> str:
    """The batch script for ``sub`` with its outputs under the absolute ``run_dir``."""
    if not sub.template.is_file():
        raise UserError(f"--template {sub.template}: no such file (the default is {TEMPLATE})")
    resources = []
    if sub.gpus_per_node > 0:
        resources.append(f"--gpus-per-node={sub.gpus_per_node}")
    optional = [
        ("cpus-per-task", sub.cpus_per_task),
        ("time", sub.time),
        ("partition", sub.partition),
        ("account", sub.account),
        ("qos", sub.qos),
        ("constraint", sub.constraint),
    ]
    resources += [f"--{name}={value}" for name, value in optional if value is not None]
    values = {
        "job_name": sub.resolved_job_name,
        "nodes": str(sub.nodes),
        "tasks_per_node": str(sub.ranks_per_node),
        "resource_lines": "\n".join(f"#SBATCH {line}" for line in resources),
        "workdir": str(Path.cwd()),
        "run_dir": str(run_dir),
        "run_dir_quoted": shlex.quote(str(run_dir)),
        "signal_seconds": str(sub.signal_seconds),
        "max_requeues": str(sub.max_requeues),
        "train_command": shlex.join(train_command(run_dir)),
    }
    return render_template(sub.template.read_text(), values, source=str(sub.template))


# --- submission --------------------------------------------------------------------------------


def sbatch(script: Path) -> str:
    """Submit ``script``; returns the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise UserError(
            "sbatch not found on PATH: run `switchdit submit` where Slurm's client commands are installed "
            f"(a login node), or submit {script} with sbatch from there"
        )
    out = subprocess.run([exe, "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"sbatch rejected {script}: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch printed {out.stdout.strip()!r}, expected a job id")
    return job_id


def log_paths(run_dir: Path, job_id: str) -> dict[str, str]:
    return {
        "script": str(run_dir / SCRIPT_NAME),
        "config": str(run_dir / CONFIG_NAME),
        "batch log": str(run_dir / "logs" / f"slurm-{job_id}.out"),
        "rank logs": str(run_dir / "logs" / f"{job_id}.<attempt>" / "rank-<rank>.log"),
        "attempts": str(run_dir / "attempts.jsonl"),
        "metrics": str(run_dir / "metrics.jsonl"),
        "checkpoints": str(run_dir / "checkpoints"),
    }


def submit(sub: SubmitConfig, dry_run: bool = False) -> str | None:
    """Validate, render, store and submit. Returns the job id (None for a dry run)."""
    from switchdit_dist.config import save_resolved
    from switchdit_dist.train.resume_config import check as check_resume_settings

    config = check_submit_config(sub)
    run_dir = (sub.run_dir or default_run_dir(sub.config)).absolute()
    check_resume_settings(run_dir, config)  # what a resume may not change, before the job queues
    check_resume_layout(run_dir, config, sub.world_size)
    script = render_script(sub, run_dir)
    if dry_run:
        print(script, end="")
        return None
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    save_resolved(config, run_dir / CONFIG_NAME)
    (run_dir / SCRIPT_NAME).write_text(script)
    job_id = sbatch(run_dir / SCRIPT_NAME)
    print(f"submitted job {job_id}: {sub.world_size} ranks on {sub.nodes} node(s)")
    for name, path in log_paths(run_dir, job_id).items():
        print(f"  {name + ':':13s}{path}")
    return job_id


# --- CLI ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML config (see configs/)")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per node, one rank each; 0 runs CPU ranks"
    )
    parser.add_argument(
        "--tasks-per-node", type=int, default=None, help="ranks per node with --gpus-per-node 0 (default 1)"
    )
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--time", help="time limit, e.g. 4:00:00 or 2-00:00:00 (default: the partition's)")
    parser.add_argument("--qos", help="Slurm quality of service")
    parser.add_argument("--constraint", help="Slurm node features, e.g. a100")
    parser.add_argument(
        "--cpus-per-task", type=int, help="CPU cores per rank (data loader workers need some)"
    )
    parser.add_argument("--job-name", help="job name (default switchdit-<config name>)")
    parser.add_argument(
        "--run-dir", type=Path, help="run directory on a shared filesystem (default runs/<config>-<time>)"
    )
    parser.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        help="requeue at most this often after a checkpointed stop (default 3)",
    )
    parser.add_argument(
        "--signal-seconds",
        type=int,
        default=300,
        help="send the early warning (SIGUSR2) this long before the time limit (default 300)",
    )
    parser.add_argument(
        "--template",
        type=Path,
        default=TEMPLATE,
        help="batch script template (a site's own copy of the default)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.steps=100"
    )


def run(args: argparse.Namespace) -> int:
    sub = SubmitConfig(
        config=args.config,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        partition=args.partition,
        account=args.account,
        time=args.time,
        qos=args.qos,
        constraint=args.constraint,
        cpus_per_task=args.cpus_per_task,
        job_name=args.job_name,
        run_dir=args.run_dir,
        max_requeues=args.max_requeues,
        signal_seconds=args.signal_seconds,
        overrides=list(args.overrides),
        template=args.template,
    )
    submit(sub, dry_run=args.dry_run)
    return 0
