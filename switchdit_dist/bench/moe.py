"""``switchdit bench moe``: forward+backward time of one MoE layer, three implementations side by side.

Implementations, all fed the same per-sample routing and weights (paper experts: D->D linear):

- ``ours``: ``ExpertParallelMoE`` (dropless, permutation-based whole-sample dispatch);
- ``weights``: ``ExpertParallelMoE`` with ``expert_comm=weights`` (the experts all-gathered and
  mixed per sample, their gradients reduce-scattered);
- ``deepspeed``: DeepSpeed's stock ``MOELayer`` with ``drop_tokens=False`` semantics (every expert's
  buffer padded to the busiest expert's load over the EP group);
- ``dense``: one dense layer with the same active FLOPs (each sample through k D->D maps, weighted).

Shapes: Switch-DiT-S (D=384) and -B (D=768), 256-token samples, E=8 experts, top-2. Routing:
``balanced`` (every expert gets the same load on every rank) and ``skewed`` (every sample's first
slot is expert 0). Run with one process, then with two processes (EP 2) that the benchmark spawns.
Each process uses one thread. The three implementations are timed in turn within each repeat;
times are medians over ``--repeats``; with two processes an iteration's time is the slower rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from switchdit_dist.errors import UserError
from switchdit_dist.train import comm, deepspeed_adapter

IMPLS = ("ours", "weights", "deepspeed", "dense")
ROUTINGS = ("balanced", "skewed")


@dataclass
class MoEBenchConfig:
    dims: dict[str, int] = field(default_factory=lambda: {"S": 384, "B": 768})
    tokens: int = 256
    batch: int = 8  # samples per process
    num_experts: int = 8
    top_k: int = 2
    repeats: int = 5
    warmup: int = 1


TINY = {"dims": {"S": 16, "B": 32}, "tokens": 4, "batch": 4}


@dataclass
class Row:
    shape: str
    ep: int
    routing: str
    impl: str
    ms: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per measurement (median)")
    parser.add_argument("--batch", type=int, default=8, help="samples of 256 tokens per process")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a quick smoke run")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    config = MoEBenchConfig(repeats=args.repeats, batch=args.batch)
    if args.tiny:
        config = MoEBenchConfig(repeats=args.repeats, **TINY)
    rows = measure_in_this_process(config) + measure_on_two_processes(config)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        print(format_table(rows, config))
    return 0


# --------------------------------------------------------------------------- implementations


class DenseEquivalent(nn.Module):
    """Every sample through k D->D maps (one fused matmul), weighted: the MoE's active FLOPs, dense."""

    def __init__(self, dim: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.linear = nn.Linear(dim, top_k * dim)

    def forward(
        self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor
    ) -> torch.Tensor:
        b, length, d = x.shape
        h = self.linear(x).view(b, length, self.top_k, d)
        return torch.einsum("blkd,bk->bld", h, expert_weight.to(h.dtype))


def build_layer(impl: str, dim: int, config: MoEBenchConfig, ep: int, group) -> nn.Module:
    from switchdit_dist.bench.deepspeed_stock import DeepSpeedStockExperts
    from switchdit_dist.moe.layer import ExpertParallelMoE

    if impl in ("ours", "weights"):
        layer = ExpertParallelMoE(
            dim, config.num_experts, ep, expert_comm="weights" if impl == "weights" else "tokens"
        )
    elif impl == "deepspeed":
        layer = DeepSpeedStockExperts(dim, config.num_experts, ep)
    else:
        layer = DenseEquivalent(dim, config.top_k)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=dim**-0.5)
    if ep > 1 and impl != "dense":
        layer.set_process_group(group)
    return layer


def routing(kind: str, config: MoEBenchConfig, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample routing of this process's batch. ``balanced``: consecutive global samples take
    consecutive experts, so every expert gets the same load on every rank. ``skewed``: every sample's
    first slot is expert 0, the second slot is spread over the others."""
    e, k = config.num_experts, config.top_k
    sample = torch.arange(config.batch) + rank * config.batch
    if kind == "balanced":
        index = (sample[:, None] * k + torch.arange(k)[None, :]) % e
    else:
        others = 1 + (sample[:, None] * (k - 1) + torch.arange(k - 1)[None, :]) % (e - 1)
        index = torch.cat([torch.zeros(config.batch, 1, dtype=torch.long), others], dim=1)
    weight = torch.softmax(torch.randn(config.batch, e, generator=torch.Generator().manual_seed(rank)), -1)
    return index, weight.gather(1, index)


def time_iteration(layer: nn.Module, x, index, weight, grad_out, group) -> float:
    """Forward+backward milliseconds of one call (the slower rank's, when distributed)."""
    layer.zero_grad(set_to_none=True)
    xi, wi = x.detach().requires_grad_(), weight.detach().requires_grad_()
    if group is not None:
        comm.barrier(group)
    start = time.perf_counter()
    layer(xi, index, wi).backward(grad_out)
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    if group is not None:
        comm.all_reduce_max([elapsed], group=group)
    return elapsed.item() * 1e3


def measure(config: MoEBenchConfig, ep: int, rank: int, group) -> list[Row]:
    rows = []
    generator = torch.Generator().manual_seed(1234 + rank)
    for shape, dim in config.dims.items():
        x = torch.randn(config.batch, config.tokens, dim, generator=generator)
        grad_out = torch.randn(config.batch, config.tokens, dim, generator=generator)
        for kind in ROUTINGS:
            index, weight = routing(kind, config, rank)
            torch.manual_seed(0)
            layers = {impl: build_layer(impl, dim, config, ep, group) for impl in IMPLS}
            times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
            # Round-robin over the implementations, so that a change in machine load hits all of them.
            for i in range(config.warmup + config.repeats):
                for impl, layer in layers.items():
                    ms = time_iteration(layer, x, index, weight, grad_out, group)
                    if i >= config.warmup:
                        times[impl].append(ms)
            rows += [Row(shape, ep, kind, impl, round(statistics.median(times[impl]), 3)) for impl in IMPLS]
    return rows


# --------------------------------------------------------------------------- processes


def measure_in_this_process(config: MoEBenchConfig) -> list[Row]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same share of the machine as each of the two EP processes
    try:
        return measure(config, ep=1, rank=0, group=None)
    finally:
        torch.set_num_threads(threads)


def _ep_worker(rank: int, world: int, port: int, config: MoEBenchConfig, results) -> None:
    from switchdit_dist.train.distributed import export_local_rank

    export_local_rank(rank, world, port)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    try:
        import deepspeed

        dist.init_process_group("gloo", rank=rank, world_size=world)
        deepspeed_adapter.skip_shared_memory_op()
        deepspeed.init_distributed(dist_backend="gloo")  # the stock layer talks through deepspeed.comm
        rows = measure(config, ep=world, rank=rank, group=dist.group.WORLD)
        if rank == 0:
            results.put(("ok", rows))
        comm.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise


def measure_on_two_processes(config: MoEBenchConfig, timeout_s: float = 1800.0) -> list[Row]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [
        ctx.Process(target=_ep_worker, args=(r, 2, port, config, results), daemon=True) for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        status, payload = results.get(timeout=timeout_s)
        if status != "ok":
            raise RuntimeError(f"EP-2 benchmark process failed: {payload}")
        for p in procs:
            p.join(timeout=60)
        return payload
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


# --------------------------------------------------------------------------- output


def format_table(rows: list[Row], config: MoEBenchConfig) -> str:
    ms = {(r.shape, r.ep, r.routing, r.impl): r.ms for r in rows}
    header = (
        f"MoE layer forward+backward, {config.batch} samples x {config.tokens} tokens per process, "
        f"E={config.num_experts}, k={config.top_k}, linear experts, fp32, 1 thread per process, "
        f"median of {config.repeats}"
    )
    lines = [
        header,
        "",
        f"{'shape':<6}{'ep':>3}  {'routing':<9}{'ours ms':>10}{'weights ms':>12}{'deepspeed ms':>14}"
        f"{'dense ms':>10}{'ours/deepspeed':>16}{'ours/dense':>12}{'weights/ours':>14}{'weights/dense':>15}",
    ]
    for shape in config.dims:
        for ep in (1, 2):
            for kind in ROUTINGS:
                ours, weights, stock, dense = (ms[(shape, ep, kind, impl)] for impl in IMPLS)
                lines.append(
                    f"{shape:<6}{ep:>3}  {kind:<9}{ours:>10.1f}{weights:>12.1f}{stock:>14.1f}{dense:>10.1f}"
                    f"{ours / stock:>16.2f}{ours / dense:>12.2f}"
                    f"{weights / ours:>14.2f}{weights / dense:>15.2f}"
                )
    return "\n".join(lines)
