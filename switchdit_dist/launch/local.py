"""``switchdit launch --nproc N -- train ...``: N ranks on this machine through torchrun.

torchrun's agent watches the ranks: when one dies (even by SIGKILL) it stops the others, so a
crashed job ends instead of hanging in a collective, and a SIGTERM/SIGINT sent to the launcher is
forwarded to every rank (which then checkpoint, see ``train/signals.py``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from switchdit_dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc", type=int, required=True, help="number of ranks (processes) on this machine"
    )
    parser.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free one)")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- SUBCOMMAND ARGS (e.g. -- train --config ...)"
    )


def build_command(nproc: int, command: list[str], port: int = 0) -> list[str]:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError(
            "launch: nothing to run; usage: switchdit launch --nproc N -- train --config ... --run-dir ..."
        )
    if nproc < 1:
        raise UserError(f"launch: --nproc must be >= 1, got {nproc}")
    rdzv = [f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-backend=c10d"] if port else ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rdzv,
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        "-m",
        "switchdit_dist.cli",
        *command,
    ]


def run(args: argparse.Namespace) -> int:
    cmd = build_command(args.nproc, list(args.command), args.master_port)
    env = dict(os.environ)
    # One thread per rank unless the user chose otherwise: ranks oversubscribe small machines.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return proc.wait()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
