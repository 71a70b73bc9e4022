"""The collectives this project issues itself (the MoE token exchange in ``moe/dispatch.py`` aside).

Each helper puts its tensors on a device the group has a backend for: the current CUDA device when
the group's CUDA backend is NCCL (a group may carry no CPU backend at all), the CPU otherwise. A
flag decision then costs one tiny copy to the GPU and back, which is cheap next to a step.

With no process group every helper returns the local value. With one, it always issues its
collective, at world size 1 too, so that a single GPU runs the same path as a whole job.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def active() -> bool:
    """Whether a process group exists, i.e. whether collectives are issued."""
    return dist.is_available() and dist.is_initialized()


def device_for_config(backend_config: str) -> torch.device:
    """The control-tensor device for a backend configuration such as ``"cpu:gloo,cuda:nccl"``."""
    backends = dict(pair.split(":", 1) for pair in backend_config.lower().split(",") if ":" in pair)
    if backends.get("cuda") == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device(group: ProcessGroup | None = None) -> torch.device:
    """Where ``group``'s (default: the world's) small tensors live; the CPU without a group."""
    if not active():
        return torch.device("cpu")
    return device_for_config(dist.get_backend_config(group))


def _all_reduce(
    tensors: Sequence[torch.Tensor], op: dist.ReduceOp.RedOpType, group: ProcessGroup | None
) -> None:
    if not tensors or not active():
        return
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"all-reduce of mixed dtypes {sorted(map(str, dtypes))}: reduce them separately")
    # One flat buffer: one collective however many tensors, each left on its own device.
    where = device(group)
    flat = torch.cat([t.detach().reshape(-1).to(where) for t in tensors])
    dist.all_reduce(flat, op=op, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()


def all_reduce_sum(tensors: Sequence[torch.Tensor], group: ProcessGroup | None = None) -> None:
    """Sum each tensor over the group, in place (one dtype; float64 is fine on gloo and NCCL)."""
    _all_reduce(tensors, dist.ReduceOp.SUM, group)


def all_reduce_max(tensors: Sequence[torch.Tensor], group: ProcessGroup | None = None) -> None:
    """Element-wise maximum of each tensor over the group, in place."""
    _all_reduce(tensors, dist.ReduceOp.MAX, group)


def max_int(value: int, group: ProcessGroup | None = None) -> int:
    """The largest ``value`` over the group's ranks."""
    tensor = torch.tensor([value], dtype=torch.int64)
    all_reduce_max([tensor], group)
    return int(tensor.item())


def max_ints_on_device(values: torch.Tensor, group: ProcessGroup | None = None) -> list[int]:
    """Element-wise maximum over the group of an int64 vector, read back with one host read. Build
    ``values`` on ``device(group)`` from device results and ``torch.full`` fills (no host copy), so
    that several per-step decisions cost one collective and one sync together."""
    all_reduce_max([values], group)
    return [int(v) for v in values.tolist()]


def any_rank(flag: bool, group: ProcessGroup | None = None) -> bool:
    """True on every rank if ``flag`` is true on any rank of the group."""
    return max_int(int(bool(flag)), group) > 0


def barrier(group: ProcessGroup | None = None) -> None:
    """Wait until every rank of the group gets here."""
    if active():
        dist.barrier(group=group)


def all_gather_objects(value: object, group: ProcessGroup | None = None) -> list[object]:
    """``value`` of every rank of the group, in rank order (picklable objects; small ones: this
    is for bookkeeping such as checkpoint manifests, not for tensors)."""
    if not active():
        return [value]
    out: list[object] = [None] * dist.get_world_size(group)
    with warnings.catch_warnings():  # torch's own use of a deprecated collective inside
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_object(out, value, group=group)
    return out


def new_cpu_group(timeout_s: float | None = None) -> ProcessGroup | None:
    """A gloo group of all ranks, for collectives issued from a background thread (asynchronous
    checkpoint writes) while the training loop uses the default group. Collective: every rank
    must call it, in the same order relative to other group creations. None without a group."""
    if not active():
        return None
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s is not None else {}
    return dist.new_group(backend="gloo", **kwargs)
