"""``switchdit bench data``: loader throughput per worker against what training consumes.

Writes shards of XL/2-shaped latents (4x32x32 float16, what a 256px image becomes in the SD VAE)
to a temporary folder, runs ``LatentLoader`` on one rank with each requested number of workers
for a fixed time, and prints samples/s and MB/s (bytes read from the shards) next to the rate
one rank must deliver: ``global batch / (ranks x step time)``. The ratio says how many times
over the loader keeps up; below 1 the GPUs wait for data.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from switchdit_dist.data.config import DataConfig
from switchdit_dist.data.loader import LatentLoader
from switchdit_dist.data.writers.synthetic import write_synthetic
from switchdit_dist.errors import UserError

LATENT_SHAPE = (4, 32, 32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0 = in-process)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per worker count")
    parser.add_argument("--samples", type=int, default=8000, help="samples written for the benchmark")
    parser.add_argument("--shards", type=int, default=8, help="shards they are split into")
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank micro-batch the loader yields")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="data.shuffle_buffer")
    parser.add_argument("--global-batch", type=int, default=256, help="images per optimizer step, all ranks")
    parser.add_argument(
        "--step-time",
        type=float,
        default=0.25,
        help="seconds per optimizer step assumed for the comparison (take it from "
        "`switchdit bench train` or a training log)",
    )
    parser.add_argument("--ranks", type=int, default=8, help="data-parallel ranks sharing the global batch")
    parser.add_argument("--dir", default="", help="write the shards here instead of a temporary folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(config: DataConfig, batch_size: int, seconds: float) -> dict[str, float]:
    """Wall-clock rate over at least ``seconds`` (after a first batch that starts the workers), and
    the CPU time per sample of the training process and of the (finished) worker processes: on a
    busy machine the CPU figures say what one free core would deliver."""
    batches = iter(LatentLoader(config, batch_size=batch_size, rank=0, world_size=1))
    next(batches)
    samples = 0
    main_cpu, workers_cpu = time.process_time(), _children_cpu()
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        samples += len(next(batches).keys)
    main_cpu = time.process_time() - main_cpu
    batches.close()  # stops and reaps the workers, so their CPU time is counted
    workers_cpu = _children_cpu() - workers_cpu
    return {
        "samples": samples,
        "seconds": elapsed,
        "main_cpu_us_per_sample": main_cpu / samples * 1e6,
        "worker_cpu_us_per_sample": workers_cpu / samples * 1e6,
    }


def run(args: argparse.Namespace) -> int:
    try:
        worker_counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise UserError(
            f"--workers: expected comma-separated integers like 1,2, got {args.workers!r}"
        ) from None
    if min(worker_counts) < 0 or args.seconds <= 0 or args.step_time <= 0 or args.ranks < 1:
        raise UserError("--workers must be >= 0; --seconds, --step-time and --ranks must be positive")
    with tempfile.TemporaryDirectory(prefix="switchdit-bench-data-") as tmp:
        folder = Path(args.dir or tmp)
        per_shard = -(-args.samples // args.shards)
        counts = [min(per_shard, args.samples - i * per_shard) for i in range(args.shards)]
        write_synthetic(
            folder, [c for c in counts if c > 0], latent_shape=LATENT_SHAPE, dtype="float16", num_classes=1000
        )
        bytes_per_sample = sum(p.stat().st_size for p in folder.glob("*.tar")) / args.samples
        need_job = args.global_batch / args.step_time
        need_rank = need_job / args.ranks
        results = []
        for workers in worker_counts:
            config = DataConfig(shards=str(folder), num_workers=workers, shuffle_buffer=args.shuffle_buffer)
            m = measure(config, args.batch_size, args.seconds)
            rate = m["samples"] / m["seconds"]
            results.append(
                {
                    "workers": workers,
                    "samples_per_s": round(rate, 1),
                    "mb_per_s": round(rate * bytes_per_sample / 1e6, 2),
                    "samples_per_s_per_worker": round(rate / max(1, workers), 1),
                    "ratio_to_rank_need": round(rate / need_rank, 2),
                    "ratio_to_job_need": round(rate / need_job, 3),
                    "main_cpu_us_per_sample": round(m["main_cpu_us_per_sample"], 1),
                    "worker_cpu_us_per_sample": round(m["worker_cpu_us_per_sample"], 1),
                }
            )
    report = {
        "latent_shape": list(LATENT_SHAPE),
        "latent_dtype": "float16",
        "bytes_per_sample": round(bytes_per_sample, 1),
        "batch_size": args.batch_size,
        "shuffle_buffer": args.shuffle_buffer,
        "global_batch": args.global_batch,
        "step_time_s": args.step_time,
        "ranks": args.ranks,
        "need_samples_per_s_job": round(need_job, 1),
        "need_samples_per_s_rank": round(need_rank, 1),
        "results": results,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"latents {LATENT_SHAPE} float16, {bytes_per_sample:.0f} bytes per sample in the shards, "
        f"shuffle buffer {args.shuffle_buffer}, batch {args.batch_size}"
    )
    print(
        f"training needs {need_job:.0f} samples/s ({args.global_batch} images per {args.step_time} s step), "
        f"{need_rank:.0f} samples/s per rank over {args.ranks} ranks"
    )
    print(
        f"{'workers':>7} {'samples/s':>10} {'MB/s':>8} {'per worker':>11} {'x rank need':>12} "
        f"{'x job need':>11} {'main us/smp':>12} {'worker us/smp':>14}"
    )
    for r in results:
        print(
            f"{r['workers']:>7} {r['samples_per_s']:>10.0f} {r['mb_per_s']:>8.1f} "
            f"{r['samples_per_s_per_worker']:>11.0f} {r['ratio_to_rank_need']:>12.2f} "
            f"{r['ratio_to_job_need']:>11.3f} {r['main_cpu_us_per_sample']:>12.1f} "
            f"{r['worker_cpu_us_per_sample']:>14.1f}"
        )
    print("us/smp: CPU microseconds per sample in the training process and in all its workers together")
    return 0
