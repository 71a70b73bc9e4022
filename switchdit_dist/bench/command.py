"""``switchdit bench {moe,data,train,ckpt,placement}``: each benchmark lives in its own module of
this package, which provides ``add_arguments(parser)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "moe": (
        "switchdit_dist.bench.moe",
        "one MoE layer: this project's dispatch vs DeepSpeed's MOELayer vs dense",
    ),
    "data": ("switchdit_dist.bench.data", "loader throughput per worker vs one training step's needs"),
    "train": ("switchdit_dist.bench.train", "training-step throughput, DiT vs Switch-DiT (and MFU on GPU)"),
    "ckpt": ("switchdit_dist.bench.ckpt", "checkpoint bytes on disk and training time blocked per save"),
    "placement": (
        "switchdit_dist.bench.placement",
        "all-to-all bytes per step, parallel.placement random vs route_aware",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    for name, (module_name, help_text) in BENCHMARKS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        try:
            importlib.import_module(module_name).add_arguments(sp)
        except ModuleNotFoundError:
            pass  # benchmark not available in this build


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args)
