"""Process-group set-up from the torchrun / SLURM environment variables."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from switchdit_dist.errors import UserError
from switchdit_dist.train import comm, deepspeed_adapter


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_spec(backend: str, use_cuda: bool) -> str:
    """The per-device backend string for ``init_process_group``: gloo always carries CPU tensors
    (NCCL has no CPU backend, and control flags and metric sums start on the CPU), NCCL or gloo
    the CUDA ones. A string that already names devices (``"cpu:gloo,cuda:nccl"``) is kept."""
    if ":" in backend:
        return backend
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend not in ("gloo", "nccl"):
        raise UserError(f"parallel.backend={backend!r}: expected auto, gloo, nccl or a per-device form")
    if not use_cuda:
        if backend == "nccl":
            raise UserError("parallel.backend=nccl needs CUDA, and none is available here")
        return "cpu:gloo"
    return f"cpu:gloo,cuda:{backend}"


def setup(backend: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Create the process group with a backend per device, then hand it to DeepSpeed (which reuses
    an initialised torch group and only adds its own communication layer on top).

    A single process without launcher variables gets a one-rank group on a local port, so that
    the same code path (DeepSpeed engine, expert groups, collectives) runs everywhere.
    """
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available()
    spec = backend_spec(backend, use_cuda)
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        kwargs = {}
        # The binding DeepSpeed would make itself: NCCL connects eagerly and splits sub-groups
        # from the world communicator, except in a single-rank job, which has no peer.
        if use_cuda and world > 1:
            kwargs["device_id"] = device
        dist.init_process_group(backend=spec, rank=rank, world_size=world, timeout=timeout, **kwargs)
    deepspeed_adapter.skip_shared_memory_op()
    deepspeed.init_distributed(dist_backend=spec, timeout=timeout)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def teardown(barrier: bool = True) -> None:
    """Leave the process group; ``barrier``: after every rank has arrived (a clean end), not on an
    error path where a peer may never come."""
    if dist.is_initialized():
        try:
            if barrier:
                comm.barrier()
        finally:
            dist.destroy_process_group()


def export_local_rank(rank: int, world_size: int, port: int) -> None:
    """The launcher variables of rank ``rank`` of a job on this machine (for processes this
    project spawns itself: benchmarks, tests)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
