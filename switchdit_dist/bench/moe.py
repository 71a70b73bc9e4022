"""``switchdit bench moe``: forward+backward time of one MoE layer, three implementations side by side.

Implementations, all fed the same per-sample routing and weights (paper experts: D->D linear):

- ``ours``: ``ExpertParallelMoE`` (dropless, permutation-based whole-sample dispatch);
- ``weights``: ``ExpertParallelMoE`` with ``expert_comm=weights`` (the experts all-gathered and
  mixed per sample, their gradients reduce-scattered);
- ``deepspeed``: DeepSpeed's stock ``MOELayer`` with ``drop_tokens=False`` semantics (every expert's
  buffer padded to the busiest expert's load over the EP group);
- ``dense``: one dense layer with the same active FLOPs (each sample through k D->D maps, weighted).

With ``--device cuda`` (one GPU, so EP 1 only; bf16 autocast, fp32 weights, as training runs), also
MLP experts (D -> 4D -> D) through ``ExpertParallelMoE``: ``mlp_loop`` (two matmuls per expert) and
``mlp_grouped`` (one ``torch._grouped_mm`` per layer for all experts, the CUDA default).

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
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn

from switchdit_dist.errors import UserError
from switchdit_dist.train import comm, deepspeed_adapter

IMPLS = ("ours", "weights", "deepspeed", "dense")
CUDA_IMPLS = IMPLS + ("mlp_loop", "mlp_grouped")
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
    device: str = "cpu"

    @property
    def impls(self) -> tuple[str, ...]:
        return CUDA_IMPLS if self.device == "cuda" else IMPLS


TINY = {"dims": {"S": 16, "B": 32}, "tokens": 4, "batch": 4, "warmup": 1}
# On a GPU: the paper's largest size too, a per-GPU batch as in its training, more warm-up.
CUDA_SHAPES = {"dims": {"S": 384, "B": 768, "XL": 1152}, "batch": 32, "warmup": 3}


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
    parser.add_argument(
        "--batch", type=int, default=None, help="samples of 256 tokens per process (default 8; 32 on cuda)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU, EP 1, bf16, S/B/XL"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a quick smoke run")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    config = MoEBenchConfig(repeats=args.repeats, device=args.device, **(CUDA_SHAPES if cuda else {}))
    if args.batch is not None:
        config = replace(config, batch=args.batch)
    if args.tiny:
        config = replace(config, **TINY)
    if cuda:  # one GPU: EP 1 only
        rows = measure(config, ep=1, rank=0, group=None)
    else:
        rows = measure_in_this_process(config) + measure_on_two_processes(config)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        print(format_cuda_table(rows, config) if config.device == "cuda" else format_table(rows, config))
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
    elif impl in ("mlp_loop", "mlp_grouped"):
        layer = ExpertParallelMoE(dim, config.num_experts, ep, kind="mlp", mlp_ratio=4.0)
        layer.deepspeed_moe.grouped = impl == "mlp_grouped"
    elif impl == "deepspeed":
        layer = DeepSpeedStockExperts(dim, config.num_experts, ep)
    else:
        layer = DenseEquivalent(dim, config.top_k)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=dim**-0.5)
    if ep > 1 and impl != "dense":
        layer.set_process_group(group)
    return layer.to(config.device)


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
    """Forward+backward milliseconds of one call (the slower rank's, when distributed). On a GPU:
    bf16 autocast, and the device's queue drained before and after."""
    layer.zero_grad(set_to_none=True)
    xi, wi = x.detach().requires_grad_(), weight.detach().requires_grad_()
    if group is not None:
        comm.barrier(group)
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
        out = layer(xi, index, wi)
    out.backward(grad_out.to(out.dtype))
    if cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    if group is not None:
        comm.all_reduce_max([elapsed], group=group)
    return elapsed.item() * 1e3


def measure(config: MoEBenchConfig, ep: int, rank: int, group) -> list[Row]:
    rows = []
    generator = torch.Generator().manual_seed(1234 + rank)
    device = torch.device(config.device)
    for shape, dim in config.dims.items():
        x = torch.randn(config.batch, config.tokens, dim, generator=generator).to(device)
        grad_out = torch.randn(config.batch, config.tokens, dim, generator=generator).to(device)
        for kind in ROUTINGS:
            index, weight = (t.to(device) for t in routing(kind, config, rank))
            torch.manual_seed(0)
            layers = {impl: build_layer(impl, dim, config, ep, group) for impl in config.impls}
            times: dict[str, list[float]] = {impl: [] for impl in config.impls}
            # Round-robin over the implementations, so that a change in machine load hits all of them,
            # in an order reversed every repetition (a call right after another one can run slower).
            for i in range(config.warmup + config.repeats):
                for impl, layer in list(layers.items())[:: 1 if i % 2 == 0 else -1]:
                    ms = time_iteration(layer, x, index, weight, grad_out, group)
                    if i >= config.warmup:
                        times[impl].append(ms)
            rows += [
                Row(shape, ep, kind, impl, round(statistics.median(times[impl]), 3)) for impl in config.impls
            ]
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
        f"{'dense ms':>10}{'ours/deepspeed':>16}{'ours/dense':>12}{'weights/ours':>14}{'weights/dense':>15}"
        f"{'auto':>9}{'auto/dense':>12}{'tokens MB':>11}{'weights MB':>12}",
    ]
    for shape, dim in config.dims.items():
        for ep in (1, 2):
            cost, auto = auto_choice(config, dim, ep)
            for kind in ROUTINGS:
                ours, weights, stock, dense = (ms[(shape, ep, kind, impl)] for impl in IMPLS)
                chosen = weights if auto == "weights" else ours
                lines.append(
                    f"{shape:<6}{ep:>3}  {kind:<9}{ours:>10.1f}{weights:>12.1f}{stock:>14.1f}{dense:>10.1f}"
                    f"{ours / stock:>16.2f}{ours / dense:>12.2f}"
                    f"{weights / ours:>14.2f}{weights / dense:>15.2f}"
                    f"{auto:>9}{chosen / dense:>12.2f}{cost.tokens / 1e6:>11.2f}{cost.weights / 1e6:>12.2f}"
                )
    lines.append(
        "auto: what parallel.expert_comm=auto picks for this layer; MB: what one rank sends in one forward "
        "call under each strategy (tokens: out and back, uniform routing; weights: its experts; the "
        "backward sends as many)"
    )
    return "\n".join(lines)


def auto_choice(config: MoEBenchConfig, dim: int, ep: int):
    """The byte costs of both strategies for this layer, and ``auto``'s pick (fp32 values)."""
    from types import SimpleNamespace

    from switchdit_dist.expert_comm import expert_comm_bytes

    layer = SimpleNamespace(
        top_k=config.top_k, num_patches=config.tokens, hidden_size=dim, num_experts=config.num_experts
    )
    cost = expert_comm_bytes(layer, config.batch, ep, 4)
    return cost, cost.choice("linear", ep)


def format_cuda_table(rows: list[Row], config: MoEBenchConfig) -> str:
    ms = {(r.shape, r.routing, r.impl): r.ms for r in rows}
    lines = [
        f"MoE layer forward+backward on {torch.cuda.get_device_name()}, {config.batch} samples x "
        f"{config.tokens} tokens, E={config.num_experts}, k={config.top_k}, EP 1, bf16 autocast, "
        f"median of {config.repeats} (ms)",
        "",
        f"{'shape':<6}{'routing':<9}"
        + "".join(f"{impl:>13}" for impl in config.impls)
        + f"{'ours/dense':>12}{'weights/dense':>15}{'grouped/loop':>14}",
    ]
    for shape in config.dims:
        for kind in ROUTINGS:
            t = {impl: ms[(shape, kind, impl)] for impl in config.impls}
            lines.append(
                f"{shape:<6}{kind:<9}"
                + "".join(f"{t[impl]:>13.3f}" for impl in config.impls)
                + f"{t['ours'] / t['dense']:>12.2f}{t['weights'] / t['dense']:>15.2f}"
                f"{t['mlp_grouped'] / t['mlp_loop']:>14.2f}"
            )
    return "\n".join(lines)
