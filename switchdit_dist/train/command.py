"""``switchdit train --config CFG --run-dir DIR [key=value ...]``: one rank of a training job.

Rank, world size and rendezvous come from the environment (torchrun / ``switchdit launch`` /
SLURM set them); without them this is a one-process run. The config is validated before any
process group starts. Running the same command again with the same run directory resumes.
"""

from __future__ import annotations

import argparse
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
    from switchdit_dist.train.loop import Trainer

    env = distributed.setup(config.parallel.backend, config.parallel.timeout_s)
    try:
        code = Trainer(config, Path(args.run_dir), env).run()
    except UserError as err:
        # Reported once, by every rank that hits it (they usually all do, identically).
        print(f"switchdit train: error (rank {env.rank}): {err}", file=sys.stderr, flush=True)
        return 2
    distributed.teardown()
    return code
