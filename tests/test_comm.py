"""The project's collectives: one module issues them, on every backend, at every world size."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

import switchdit_dist
from switchdit_dist.errors import UserError
from switchdit_dist.train import comm
from switchdit_dist.train.distributed import backend_spec, free_port

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(switchdit_dist.__file__).resolve().parent

# Files that may call torch.distributed collectives directly, and why.
ALLOWED = {
    "train/comm.py": "the module that owns the project's collectives",
    "moe/dispatch.py": "the MoE token exchange: all-to-all of the routed tokens on the EP group",
    "moe/weight_exchange.py": "the MoE weight exchange: experts gathered, their gradients reduce-scattered",
    "bench/deepspeed_stock.py": "stand-in for DeepSpeed's stock gate; reproduces its capacity all-reduce",
}
COLLECTIVE = re.compile(
    r"(all_reduce|all_gather|broadcast|barrier|monitored_barrier|reduce|gather|scatter|all_to_all"
    r"|send|recv|isend|irecv|batch_isend_irecv)(_\w+)?"
)
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


# --------------------------------------------------------------------------- static


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def collective_uses(source: str) -> list[str]:
    """``line: name`` of every torch.distributed / deepspeed.comm collective the source refers to,
    through any import alias (``dist.all_reduce``, ``torch.distributed.barrier``, ``from
    torch.distributed import all_gather``)."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the module (or module attribute) it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:  # `import torch.distributed` binds `torch`
                    root = alias.name.split(".")[0]
                    bound[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                if node.module in DIST_MODULES and COLLECTIVE.fullmatch(alias.name):
                    found.append(f"{node.lineno}: {node.module}.{alias.name}")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and COLLECTIVE.fullmatch(node.attr)):
            continue
        value = _dotted(node.value)
        if value is None:
            continue
        root, _, rest = value.partition(".")
        module = bound.get(root, "") + (f".{rest}" if rest else "")
        if module in DIST_MODULES:
            found.append(f"{node.lineno}: {module}.{node.attr}")
    return sorted(found)


def test_the_scanner_sees_every_import_form():
    source = """
import torch
import torch.distributed as dist
import deepspeed.comm as ds_dist
from torch import distributed as d2
from torch.distributed import all_gather_into_tensor
from switchdit_dist.train import comm

dist.all_reduce(t)
torch.distributed.barrier()
d2.broadcast_object_list(x)
ds_dist.reduce_scatter_tensor(a, b)
f = dist.isend
dist.get_world_size(); dist.ReduceOp.MAX; dist.destroy_process_group(); comm.all_reduce_sum(x)
"""
    names = [use.split(": ")[1] for use in collective_uses(source)]
    assert sorted(names) == sorted(
        [
            "torch.distributed.all_gather_into_tensor",
            "torch.distributed.all_reduce",
            "torch.distributed.barrier",
            "torch.distributed.broadcast_object_list",
            "deepspeed.comm.reduce_scatter_tensor",
            "torch.distributed.isend",
        ]
    )


def test_collectives_are_issued_only_by_the_comm_module():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        uses = collective_uses(path.read_text())
        if uses and rel not in ALLOWED:
            offenders[rel] = uses
    assert not offenders, f"collectives outside switchdit_dist/train/comm.py: {offenders}"
    for rel in ALLOWED:  # the allow-list stays exact: every entry exists and still needs its place
        assert collective_uses((PACKAGE / rel).read_text()), f"{rel} no longer issues collectives"


# --------------------------------------------------------------------------- local


def test_without_a_group_every_helper_returns_the_local_value():
    assert not dist.is_initialized()
    assert comm.device() == torch.device("cpu")
    assert comm.any_rank(True) and not comm.any_rank(False)
    assert comm.max_int(7) == 7
    a, b = torch.arange(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    comm.all_reduce_sum([a, b])
    comm.all_reduce_max([a])
    assert a.tolist() == [0.0, 1.0, 2.0] and b.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    comm.barrier()


def test_control_tensors_go_to_the_gpu_only_when_nccl_carries_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert comm.device_for_config("cpu:gloo") == torch.device("cpu")
    assert comm.device_for_config("cpu:gloo,cuda:gloo") == torch.device("cpu")
    assert comm.device_for_config("cpu:gloo,cuda:nccl") == torch.device("cuda", 0)
    assert comm.device_for_config("cuda:nccl") == torch.device("cuda", 0)


def test_backend_spec_names_a_backend_per_device():
    assert backend_spec("auto", use_cuda=False) == "cpu:gloo"
    assert backend_spec("gloo", use_cuda=False) == "cpu:gloo"
    assert backend_spec("auto", use_cuda=True) == "cpu:gloo,cuda:nccl"
    assert backend_spec("nccl", use_cuda=True) == "cpu:gloo,cuda:nccl"
    assert backend_spec("gloo", use_cuda=True) == "cpu:gloo,cuda:gloo"
    assert backend_spec("cpu:gloo,cuda:nccl", use_cuda=True) == "cpu:gloo,cuda:nccl"
    with pytest.raises(UserError, match="needs CUDA"):
        backend_spec("nccl", use_cuda=False)
    with pytest.raises(UserError, match="mpi"):
        backend_spec("mpi", use_cuda=True)


# --------------------------------------------------------------------------- processes


def _exercise(rank: int) -> dict:
    """Every helper, with per-rank inputs; also the trainer's users of them."""
    from switchdit_dist.train.finite_guard import make_guarded
    from switchdit_dist.train.metrics import IntervalStats
    from switchdit_dist.train.signals import StopRequest

    sums = [
        torch.full((2, 3), rank + 0.5, dtype=torch.float64),
        torch.tensor([1.0, rank], dtype=torch.float64),
    ]
    comm.all_reduce_sum(sums)
    peak = torch.tensor([rank, -rank], dtype=torch.float32)
    comm.all_reduce_max([peak], group=dist.group.WORLD)
    comm.barrier()
    stop = StopRequest()
    stop.signum = (signal.SIGUSR2, signal.SIGTERM)[rank % 2]
    stats = IntervalStats(num_timesteps=10, num_blocks=1, num_experts=1)
    stats.sums["loss"], stats.samples = float(rank + 1), 1
    # The optimizer guard: rank 1's gradient is NaN; the stop request rides on its all-reduce.
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.tensor([1.0, float("nan") if rank == 1 else 1.0])
    guard = make_guarded(torch.optim.SGD)([param], lr=0.5)
    guard.piggyback = stop.order
    guard.step()
    return {
        "skipped": guard.last_step_skipped,
        "param": param.detach().tolist(),
        "stop_via_guard": int(stop.agreed(guard.take_piggyback())),
        "nothing_pending": guard.take_piggyback() is None,
        "any_one": comm.any_rank(rank == 1),
        "any_none": comm.any_rank(False),
        "max": comm.max_int(10 * rank + 3),
        "sums": [t.tolist() for t in sums],
        "peak": peak.tolist(),
        "stop": int(stop.agreed()),
        "loss": stats.reduce()["loss"],
    }


def _values_worker(rank: int, world: int) -> dict:
    return _exercise(rank)


def _profiled_worker(rank: int, world: int) -> tuple[dict, dict]:
    # The backend itself reports each collective it runs (as "gloo:<op>" profiler events).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        values = _exercise(rank)
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("gloo:"):
            counts[event.name] = counts.get(event.name, 0) + 1
    return values, counts


@pytest.mark.slow
def test_two_ranks_agree_on_flags_maxima_and_sums():
    for values in run_distributed(_values_worker, 2):
        assert values["any_one"] is True and values["any_none"] is False
        assert values["max"] == 13
        assert values["sums"] == [[[2.0] * 3] * 2, [2.0, 1.0]]
        assert values["peak"] == [1.0, 0.0]
        assert values["stop"] == int(signal.SIGTERM)  # TERM wins over the early warning
        assert values["loss"] == 1.5  # (1 + 2) / 2 samples
        assert values["skipped"] is True and values["param"] == [1.0, 1.0]  # one verdict: skip
        assert values["stop_via_guard"] == int(signal.SIGTERM) and values["nothing_pending"]


@pytest.mark.slow
def test_one_rank_with_a_group_still_issues_every_collective():
    [(values, counts)] = run_distributed(_profiled_worker, 1)
    assert values["any_one"] is False and values["max"] == 3 and values["stop"] == int(signal.SIGUSR2)
    assert values["sums"] == [[[0.5] * 3] * 2, [1.0, 0.0]] and values["loss"] == 1.0
    assert values["skipped"] is False and values["param"] == [0.5, 0.5]
    assert values["stop_via_guard"] == int(signal.SIGUSR2)
    # sum, max, any_rank twice, max_int, the stop request, the interval metrics and the guard's
    # one all-reduce for both its verdict and the stop request: 8 all-reduces.
    assert counts == {"gloo:all_reduce": 8, "gloo:barrier": 1}


SETUP_SCRIPT = """
import sys, torch.distributed as dist
from switchdit_dist.train import comm, distributed
env = distributed.setup("auto", 60)
print("CONFIG", dist.get_backend_config(), dist.get_world_size(), comm.any_rank(env.rank == 1), flush=True)
distributed.teardown()
"""


def _run_setup(world: int) -> list[str]:
    base = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    base.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    if world > 1:
        base.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SETUP_SCRIPT],
            cwd=REPO,
            env=dict(base, **({"RANK": str(r), "LOCAL_RANK": str(r)} if world > 1 else {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    lines = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, out
            lines += [line for line in out.splitlines() if line.startswith("CONFIG ")]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return lines


@pytest.mark.slow
def test_setup_creates_the_group_in_per_device_form_on_cpu():
    assert _run_setup(1) == ["CONFIG cpu:gloo 1 False"]
    assert _run_setup(2) == ["CONFIG cpu:gloo 2 True"] * 2
