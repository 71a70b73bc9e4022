"""Every function of ``train/deepspeed_adapter.py`` (the DeepSpeed internals the project uses) on a
real engine: two processes, EP 2, ZeRO-2 after one optimizer step (and a ZeRO 0 engine, whose
parameters are not partitioned). A DeepSpeed upgrade
that moves one of them fails here, by name."""

from __future__ import annotations

import pytest
from distributed import run_distributed
from test_train import CONFIG

pytestmark = pytest.mark.slow


def adapter_worker(rank: int, world: int) -> dict:
    import torch

    from switchdit_dist.config import load_config
    from switchdit_dist.train import deepspeed_adapter as ds
    from switchdit_dist.train.distributed import DistEnv
    from switchdit_dist.train.engine import build_engine

    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    config = load_config(CONFIG, ["parallel.zero_stage=0"])
    zero0, _, _ = build_engine(config, config.model.build_config(), env)
    zero0_partitioned = [ds.is_partitioned(p) for p in zero0.module.parameters()]
    config = load_config(CONFIG, ["parallel.zero_stage=2"])
    engine, _, _ = build_engine(config, config.model.build_config(), env)
    out: dict = {}

    # expert-parallel groups: made by the engine, looked up by name
    name = "ep_size_2"
    out["has_groups"] = ds.has_expert_groups(name)
    ds.create_expert_groups(2)  # idempotent for an existing size
    out["ep_group_size"] = torch.distributed.get_world_size(ds.expert_parallel_group(name))
    out["ep_rank"] = ds.expert_parallel_rank(name)
    out["edp_rank"] = ds.expert_data_parallel_rank(name)

    # one step, so that the optimizer state exists
    x = torch.randn(8, 1, 16, 16)
    t = torch.randint(0, 1000, (8,))
    y = torch.randint(0, 10, (8,))
    loss = engine(x, t, y).float().pow(2).mean()
    engine.backward(loss)
    engine.step()

    out["torch_optimizer"] = isinstance(ds.torch_optimizer(engine), torch.optim.AdamW)
    out["masters"] = len(ds.fp32_master_copies(engine))  # fp32: the weights are the masters
    counters = ds.engine_counters(engine)
    ds.set_engine_counters(engine, ds.EngineCounters(7, 112, 1))
    out["counters"] = (counters.global_steps, ds.engine_counters(engine))
    params = [p for p in engine.module.parameters() if p.requires_grad]
    partitioned = [p for p in params if ds.is_partitioned(p)]
    out["partitioned"] = (len(partitioned), len(params))
    covered = 0
    for p in partitioned:
        part = ds.fragment(p)
        assert ds.data_parallel_group(p) is not None
        if part is None:
            continue
        flat = ds.flat_partition(engine, p)
        state = ds.torch_optimizer(engine).state[flat]
        ds.link_optimizer_state(p, flat, state)
        moment = ds.optimizer_state_fragment(p, "exp_avg")
        assert moment.numel() == part.numel == part.master.numel()
        # the master fragment is this rank's slice of the weight (fp32: equal to it)
        assert torch.equal(part.master, p.detach().flatten()[part.start : part.start + part.numel])
        covered += part.numel
    out["covered"] = covered
    out["zero0_partitioned"] = any(zero0_partitioned)
    # the communication layer started without building its shared-memory op
    import deepspeed.comm.comm

    out["shm_op"] = deepspeed.comm.comm.cdb.shm_comm_op
    return out


def test_every_adapter_function_works_on_a_real_engine():
    results = run_distributed(adapter_worker, 2, timeout=300)
    for rank, out in enumerate(results):
        assert out["has_groups"] and out["ep_group_size"] == 2
        assert (out["ep_rank"], out["edp_rank"]) == (rank, 0)
        assert out["torch_optimizer"] and out["masters"] == 0
        assert out["counters"][0] == 1 and out["counters"][1].global_steps == 7
        count, total = out["partitioned"]
        assert count == total > 0 and out["covered"] > 0
        assert not out["zero0_partitioned"]
        assert out["shm_op"] is None
