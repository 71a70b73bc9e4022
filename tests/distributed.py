"""Run a function on N local processes joined in a gloo process group (CPU, one thread each).

``run_distributed(fn, world_size, *args)`` starts N processes, sets the environment
``deepspeed.init_distributed`` expects (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on
a free port), initialises ``torch.distributed`` with gloo, calls ``fn(rank, world_size, *args)``
and returns the per-rank results in rank order. A failure on any rank raises with that rank's
traceback; a hang is cut off by ``timeout`` and the processes are killed.

``fn`` and its arguments must be picklable (a module-level function of the test module).
"""

from __future__ import annotations

import os
import queue
import time
import traceback

import torch.multiprocessing as mp

from switchdit_dist.train.distributed import free_port

# torch._dynamo is imported by the first torch optimizer, the muon module by DeepSpeed's optimizer
# checks (it runs torch.compile at import): together about 10 s per process on a busy 2-core box.
PRELOAD = (
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "deepspeed",
    "deepspeed.runtime.zero.muon.muon_optimizer",
)


def _entry(fn, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    from switchdit_dist.train.distributed import export_local_rank

    export_local_rank(rank, world_size, port)
    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from switchdit_dist.train import deepspeed_adapter

    deepspeed_adapter.skip_shared_memory_op()  # as the project's own entry points do
    try:
        value = fn(rank, world_size, *args)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        # Peers may be blocked in a collective; the parent kills them.
        results.close()
        results.join_thread()
        os._exit(1)
    results.put((rank, True, value))
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown (seconds with torch loaded); flush the result first.
    results.close()
    results.join_thread()
    os._exit(0)


def run_distributed(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    # Processes forked from one single-threaded server that did the slow imports once per
    # session (the first call of a session pays them), instead of once per process.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, fn.__module__])
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise AssertionError(
                    f"{fn.__name__} on {world_size} processes: no result within {timeout:.0f}s "
                    f"(got ranks {sorted(values)})"
                ) from None
            if not ok:
                raise AssertionError(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{value}")
            values[rank] = value
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]
