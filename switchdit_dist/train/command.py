"""``switchdit train --config CFG --run-dir DIR [key=value ...]``: one rank of a training job.

Rank, world size and rendezvous come from the environment (torchrun / ``switchdit launch`` /
SLURM set them); without them this is a one-process run. Running the same command again with the
same run directory resumes.

Before the trainer starts: every rank checks the config (the same on all ranks, so only rank 0
prints a problem); rank 0 then claims the run directory (``_claim``: data readable, directory
writable, the job lock of ``run_lock.py``, the settings a resume may not change) and tells the
others its verdict with one collective, so that a refused job stops on every rank with one message. The
other ranks then share the lock, rank 0 records changed settings in the run's history
(``resume_config.py``), and errors the ranks hit alike are printed once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from switchdit_dist.errors import UserError

if TYPE_CHECKING:  # (these import torch; the module stays light until a command runs)
    from switchdit_dist.config import Config
    from switchdit_dist.train.resume_config import ResumePlan
    from switchdit_dist.train.run_lock import RunLock

# How long a rank > 0 waits for rank 0's error before printing its own (see _report).
ERROR_WAIT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--run-dir", required=True, help="where checkpoints, metrics and logs go")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.steps=100 (before or after the options)",
    )


def precheck(args: argparse.Namespace, world_size: int) -> Config:
    """Everything that can be checked without a process group (for ``switchdit launch`` before it
    starts any rank): config values, data readable, run directory writable and not held by a job,
    no forbidden change on resume. Returns the config; raises one UserError."""
    from switchdit_dist.config import load_config, validate
    from switchdit_dist.train import resume_config, run_lock

    config = load_config(args.config, args.overrides)
    validate(config, world_size)
    check_data(config)
    run_dir = Path(args.run_dir)
    run_lock.check_writable(run_dir)
    run_lock.check_free(run_dir)
    resume_config.check(run_dir, config)
    return config


def check_data(config: Config) -> None:
    """Open every local shard and manifest (``validate`` only checks that they exist) and compare
    the manifest with the model, as the trainer would once every rank has started."""
    from switchdit_dist.data.config import resolve_shards
    from switchdit_dist.data.format import is_local, local_path

    specs = [("data.shards", config.data.shards, config.data.manifest)]
    if config.data.validation_shards:
        specs.append(("data.validation_shards", config.data.validation_shards, ""))
    m = config.model
    for key, spec, manifest in specs:
        shards = resolve_shards(spec, manifest, key=key)
        for url in [*shards.urls, *shards.manifest_urls]:
            if not is_local(url):
                continue
            try:
                with open(local_path(url), "rb") as f:
                    f.read(1)
            except OSError as err:
                raise UserError(f"{key}: cannot read {local_path(url)} ({err.strerror})") from None
        expected = (m.in_channels, m.input_size, m.input_size)
        if tuple(shards.manifest.latent_shape) != expected:
            raise UserError(
                f"{key} hold latents of shape {tuple(shards.manifest.latent_shape)} but the model expects "
                f"{expected} (model.in_channels, model.input_size)"
            )
        if shards.num_classes > m.num_classes:
            raise UserError(
                f"{key}: the data has {shards.num_classes} classes but model.num_classes={m.num_classes}"
            )


def _claim(args: argparse.Namespace, config: Config) -> tuple[RunLock, ResumePlan]:
    """Rank 0: the run directory's lock and resume plan, or the reason the job may not start."""
    from switchdit_dist.train import resume_config, run_lock

    run_dir = Path(args.run_dir)
    check_data(config)
    run_lock.check_writable(run_dir)
    lock = run_lock.RunLock.acquire(run_dir)
    try:
        plan = resume_config.check(run_dir, config)
    except UserError:
        lock.release()
        raise
    return lock, plan


def run(args: argparse.Namespace) -> int:
    from switchdit_dist.config import load_config, validate
    from switchdit_dist.train.distributed import env_world_size

    rank, world_size = int(os.environ.get("RANK", "0")), env_world_size()
    try:
        config = load_config(args.config, args.overrides)
        validate(config, world_size, check_data=rank == 0)
    except UserError as err:
        if rank == 0:  # the same config, so the same error, on every rank
            print(f"switchdit train: error: {err}", file=sys.stderr, flush=True)
        return 2
    claimed = None
    refused = False
    if rank == 0:
        try:
            claimed = _claim(args, config)
        except UserError as err:
            print(f"switchdit train: error: {err}", file=sys.stderr, flush=True)
            refused = True
            if world_size == 1:
                return 2

    from switchdit_dist.train import comm, distributed, resume_config, run_lock
    from switchdit_dist.train.heartbeat import EXIT_PEER_LOST, Heartbeat
    from switchdit_dist.train.loop import Trainer

    env = distributed.setup(config.parallel.backend, config.parallel.timeout_s)
    if comm.any_rank(refused):  # one verdict: every rank stops together, rank 0 said why
        distributed.teardown()
        return 2
    run_dir = Path(args.run_dir)
    try:
        lock = claimed[0] if claimed is not None else run_lock.RunLock.join(run_dir)
    except UserError as err:
        print(f"switchdit train: error (rank {env.rank}): {err}", file=sys.stderr, flush=True)
        distributed.teardown(barrier=False)
        return 2
    if claimed is not None:
        plan = claimed[1]
        resume_config.record(run_dir, config, plan)
        if plan.changed:
            changes = resume_config.describe_changes(plan)
            history = run_dir / resume_config.HISTORY_NAME
            print(
                f"resuming from step {plan.step} with changed settings: {changes} (recorded in {history})",
                flush=True,
            )
    heartbeat = None
    if env.world_size > 1:
        heartbeat = Heartbeat.from_env(env.rank, env.world_size, config.parallel.timeout_s)
        heartbeat.start()
        if env.is_main:
            hosts = " ".join(f"{r}:{host}" for r, (host, _) in sorted(heartbeat.hosts().items()))
            print(f"ranks on hosts (rank:host): {hosts}", flush=True)
    try:
        trainer = Trainer(config, run_dir, env)  # builds and resumes
        code = trainer.run()
    except UserError as err:
        _report(err, env.rank, env.world_size)
        if heartbeat is not None:
            heartbeat.stop()
        distributed.teardown(barrier=False)  # a peer that did not fail may not reach a barrier
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
    lock.release()  # after every rank is done; on any other way out, the process's end releases it
    return code


def _report(err: UserError, rank: int, world_size: int) -> None:
    """Print a rank's error once for the job: most errors (a bad checkpoint, a data mismatch, too
    many non-finite steps) hit every rank alike. Every rank posts its message on the rendezvous
    store; rank 0 prints its own, the others only one that differs from rank 0's."""
    text = str(err)
    store = _store() if world_size > 1 else None
    if store is None or rank == 0:
        print(f"switchdit train: error: {text}", file=sys.stderr, flush=True)
    if store is None:
        return
    wait = datetime.timedelta(seconds=ERROR_WAIT_S)
    try:
        store.set(f"switchdit/error/{rank}", text)
        if rank == 0:  # stay until the others have read it (rank 0 may host the store)
            store.wait([f"switchdit/error/{r}" for r in range(1, world_size)], wait)
            return
        store.wait(["switchdit/error/0"], wait)
        if store.get("switchdit/error/0").decode() == text:
            return
    except Exception:  # a peer gone, a timeout: nothing to compare with
        if rank == 0:
            return
    print(f"switchdit train: error (rank {rank}): {text}", file=sys.stderr, flush=True)


def _store():
    """A client of the rendezvous store (torchrun's agent or rank 0 serves it), or None."""
    import torch.distributed as dist

    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=ERROR_WAIT_S),
            wait_for_workers=False,
        )
    except Exception:
        return None
