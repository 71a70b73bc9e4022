"""``switchdit train --config CFG --run-dir DIR [key=value ...]``: one rank of a training job.

Rank, world size and rendezvous come from the environment (torchrun / ``switchdit launch`` /
SLURM set them); without them this is a one-process run. The config is validated before any
process group starts. Running the same command again with the same run directory resumes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from switchdit_dist.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--run-dir", required=True, help="where checkpoints, metrics and logs go")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100"
    )


def run(args: argparse.Namespace) -> int:
    from switchdit_dist.config import load_config, validate
    from switchdit_dist.train.distributed import env_world_size

    config = load_config(args.config, args.overrides)
    validate(config, env_world_size())

    from switchdit_dist.train import distributed
    from switchdit_dist.train.heartbeat import EXIT_PEER_LOST, Heartbeat
    from switchdit_dist.train.loop import Trainer

    env = distributed.setup(config.parallel.backend, config.parallel.timeout_s)
    heartbeat = None
    if env.world_size > 1:
        heartbeat = Heartbeat.from_env(env.rank, env.world_size, config.parallel.timeout_s)
        heartbeat.start()
        if env.is_main:
            hosts = " ".join(f"{r}:{host}" for r, (host, _) in sorted(heartbeat.hosts().items()))
            print(f"ranks on hosts (rank:host): {hosts}", flush=True)
    try:
        code = Trainer(config, Path(args.run_dir), env).run()
    except UserError as err:
        # Reported once, by every rank that hits it (they usually all do, identically).
        print(f"switchdit train: error (rank {env.rank}): {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:
        # A collective fails when a peer died or stopped; name it instead of the socket error.
        silent = [s for s in heartbeat.diagnose() if s.rank != env.rank] if heartbeat else []
        if not silent:
            raise
        # gloo and NCCL prefix their messages with a source location that says nothing to a user
        first_line = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [""])[0])[:200]
        first_line = first_line or type(err).__name__
        print(heartbeat.report(silent, f"a collective failed: {first_line}"), file=sys.stderr, flush=True)
        return EXIT_PEER_LOST  # no teardown: its barrier would wait for the lost rank
    if heartbeat is not None:
        heartbeat.stop()
    distributed.teardown()
    return code
