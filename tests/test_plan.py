"""`switchdit plan`: numbers against hand computations from the formulas in the module docstring."""

import json

import pytest
import torch

from switchdit_dist.capacity import (
    Hardware,
    PlanInputs,
    count_params,
    ep_peer_split,
    make_plan,
)
from switchdit_dist.cli import main
from switchdit_dist.errors import UserError
from switchdit_dist.models.registry import build_model, model_config

XL_TOKENS, XL_HIDDEN, XL_DEPTH = 256, 1152, 28
BF16 = 2
NVLINK = 300e9  # bytes/s
NETWORK = 200e9 / 8  # bytes/s


def xl_plan(num_experts, ep_size, nodes, gpus_per_node, micro_batch=32, **kw):
    config = model_config("switch-dit", "XL", 2, num_experts=num_experts, top_k=2)
    inputs = PlanInputs(config, "Switch-DiT-XL/2", ep_size=ep_size, micro_batch=micro_batch, **kw)
    return make_plan(inputs, Hardware(nodes, gpus_per_node))


def test_design_back_of_envelope_for_xl2():
    # DESIGN.md: 32 images x 256 tokens per GPU, D=1152, k=2, bf16 -> about 38 MB per direction
    # and block before the (P-1)/P share that stays local; about 4 GB per step over 28 blocks.
    everything = 32 * XL_TOKENS * XL_HIDDEN * 2 * BF16
    assert round(everything / 1e6) == 38
    assert round(everything * XL_DEPTH * 4 / 1e9) == 4
    plan = xl_plan(num_experts=8, ep_size=8, nodes=2, gpus_per_node=8)
    assert plan.alltoall.bytes_per_block_direction == everything * 7 // 8
    assert plan.alltoall.alltoalls_per_microstep == XL_DEPTH * 4
    assert plan.alltoall.bytes_per_microstep == everything * 7 // 8 * XL_DEPTH * 4
    # EP 8 inside an 8-GPU node: nothing crosses the network.
    assert plan.alltoall.inter_node_bytes_per_microstep == 0
    assert not plan.alltoall.ep_group_spans_nodes
    assert plan.alltoall.seconds_per_microstep == pytest.approx(plan.alltoall.bytes_per_microstep / NVLINK)


def test_ep_group_across_nodes_is_limited_by_the_network():
    plan = xl_plan(num_experts=16, ep_size=16, nodes=2, gpus_per_node=8)
    per_block = 32 * XL_TOKENS * XL_HIDDEN * 2 * BF16 * 15 // 16
    total = per_block * XL_DEPTH * 4
    # Balanced routing: each of the 15 peers gets 1/15 of what leaves; 8 peers are on the other node.
    inter = total * 8 // 15
    assert plan.alltoall.inter_node_bytes_per_microstep == inter
    assert plan.alltoall.intra_node_bytes_per_microstep == total - inter
    assert plan.alltoall.seconds_per_microstep == pytest.approx(
        max((total - inter) / NVLINK, inter / NETWORK)
    )
    assert plan.alltoall.ep_group_spans_nodes
    assert any("span nodes" in w for w in plan.warnings)


def test_peer_split_of_groups_that_straddle_nodes():
    assert ep_peer_split(ep_size=8, gpus_per_node=8, world_size=16) == (7, 0)
    assert ep_peer_split(ep_size=16, gpus_per_node=8, world_size=16) == (7, 8)
    # Groups of 4 over 6-GPU nodes: ranks 4,5 | 6,7 -> rank 4 has 1 peer beside it, 2 away.
    assert ep_peer_split(ep_size=4, gpus_per_node=6, world_size=12) == (1, 2)


def s2_counts():
    """Switch-DiT-S/2 with 4 experts, by hand from DiT-S/2's public count (32,963,360)."""
    d, depth, experts = 384, 12, 4
    frozen = 256 * d  # fixed position embedding
    router = d * experts + experts
    expert_params = experts * (d * d + d)
    return 32_963_360 - frozen + depth * router, frozen, depth * expert_params


def test_parameter_split_matches_hand_count_and_model():
    config = model_config("switch-dit", "S", 2, num_experts=4)
    dense, frozen, experts = s2_counts()
    counts = count_params(config, ep_size=2)
    assert (counts.dense_trainable, counts.frozen, counts.experts_total) == (dense, frozen, experts)
    assert counts.experts_per_rank == experts // 2
    with torch.device("meta"):
        total = sum(p.numel() for p in build_model(config).parameters())
    assert dense + frozen + experts == total


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_memory_per_rank_matches_hand_computation(stage, dtype):
    b = {"bf16": 2, "fp32": 4}[dtype]
    world, ep, micro = 4, 2, 8
    dense, frozen, experts = s2_counts()
    local_experts = experts // ep
    config = model_config("switch-dit", "S", 2, num_experts=4)
    inputs = PlanInputs(
        config, "Switch-DiT-S/2", ep_size=ep, zero_stage=stage, micro_batch=micro, dtype=dtype
    )
    memory = make_plan(inputs, Hardware(1, world)).memory

    full = dense + local_experts
    # Dense parameters are partitioned over all 4 ranks, experts over the 2 ranks holding them.
    partitioned = dense // world + local_experts // (world // ep)
    assert memory.parameters == (full + frozen) * b
    assert memory.gradients == (partitioned if stage >= 2 else full) * b
    assert memory.adam_moments == (partitioned if stage >= 1 else full) * 8
    assert memory.master_weights == ((partitioned if stage >= 1 else full) * 4 if dtype == "bf16" else 0)
    assert memory.ema == (full + frozen) * 4
    token_channels = micro * 256 * 384
    assert memory.activations == 12 * token_channels * (34 * b // 2 + (2 + 2 * 2) * b)
    assert (
        memory.total
        == sum([memory.parameters, memory.gradients, memory.adam_moments, memory.master_weights, memory.ema])
        + memory.activations
    )


def test_gradient_reduction_is_a_ring_over_each_data_parallel_group():
    config = model_config("switch-dit", "S", 2, num_experts=4)
    plan = make_plan(PlanInputs(config, "Switch-DiT-S/2", ep_size=2), Hardware(2, 2))
    dense, _, experts = s2_counts()
    assert plan.gradient_reduction.dense_bytes == 2 * 3 * dense * 2 // 4
    assert plan.gradient_reduction.expert_bytes == 2 * 1 * (experts // 2) * 2 // 2
    total = plan.gradient_reduction.dense_bytes + plan.gradient_reduction.expert_bytes
    assert plan.gradient_reduction.seconds == pytest.approx(total / NETWORK)


def test_dense_model_has_no_alltoall():
    plan = make_plan(PlanInputs(model_config("dit", "B", 2), "DiT-B/2"), Hardware(1, 8))
    assert plan.alltoall.bytes_per_microstep == 0
    assert plan.params.experts_total == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_experts=3, ep_size=8), "does not divide num_experts=3"),
        (dict(num_experts=8, ep_size=8, zero_stage=3), "ZeRO-3"),
        (dict(num_experts=8, ep_size=8, global_batch=100), "global batch 100"),
    ],
)
def test_bad_layouts_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        xl_plan(nodes=1, gpus_per_node=8, **kwargs)


def test_cli_plan_json(capsys):
    argv = ["plan", "--model", "Switch-DiT-XL/2", "--num-experts", "8", "--ep-size", "8"]
    assert main(argv + ["--nodes", "2", "--gpus-per-node", "8", "--global-batch", "1024", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["alltoall"]["bytes_per_block_direction"] == 32 * XL_TOKENS * XL_HIDDEN * 2 * BF16 * 7 // 8
    assert plan["grad_accumulation"] == 2
    assert plan["inputs"]["model"]["arch"] == "switch-dit"
    assert plan["memory"]["total"] > plan["memory"]["activations"] > 0


def test_cli_plan_from_config_with_override(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {arch: switch-dit, size: S, patch_size: 2, num_experts: 4, top_k: 2}\n"
        "parallel: {ep_size: 2, zero_stage: 1}\n"
        "train: {global_batch: 64, micro_batch: 8}\n"
    )
    assert main(["plan", "--config", str(config), "--set", "parallel.ep_size=4", "--nodes", "1",
                 "--gpus-per-node", "8"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "Switch-DiT-S/2 (4 linear experts, top-2)" in text
    assert "EP 4, ZeRO-1" in text
    assert "accumulation 1" in text
    per_block = 8 * 256 * 384 * 2 * BF16 * 3 // 4
    assert f"{per_block / 1e6:.2f} MB" in text
    # The overrides syntax of train, launch and submit (KEY=VALUE anywhere) gives the same plan.
    assert main(["plan", "parallel.ep_size=4", "--config", str(config), "--nodes", "1",
                 "--gpus-per-node", "8"]) == 0  # fmt: skip
    assert capsys.readouterr().out == text


def test_cli_plan_errors_name_the_value(capsys):
    assert (
        main(["plan", "--model", "Switch-DiT-XL/2", "--ep-size", "2", "--nodes", "1", "--gpus-per-node", "8"])
        == 2
    )
    assert "ep-size 2 does not divide num_experts=3" in capsys.readouterr().err
    assert main(["plan", "--model", "Big-DiT/2", "--nodes", "1", "--gpus-per-node", "8"]) == 2
    assert "'Big-DiT/2'" in capsys.readouterr().err


def test_expert_comm_weighs_tokens_against_weights(capsys):
    # The paper's configuration: 3 D x D experts are fewer bytes than 32 x 256 tokens x k=2.
    plan = xl_plan(3, ep_size=3, nodes=1, gpus_per_node=6)
    c = plan.expert_comm
    # A forward pass sends the tokens out (one all-to-all) and the expert outputs back (another).
    assert c.tokens_bytes_per_block_pass == 2 * plan.alltoall.bytes_per_block_direction
    assert c.tokens_bytes_per_block_pass == 2 * 32 * 256 * 1152 * 2 * 2 * 2 // 3
    assert c.weights_bytes_per_block_pass == int(3 * (1152**2 + 1152) * 2 * 2 / 3)
    assert c.chosen == "weights"
    # Many experts and a small micro-batch: the tokens are the smaller message.
    assert xl_plan(48, ep_size=8, nodes=1, gpus_per_node=8, micro_batch=2).expert_comm.chosen == "tokens"
    assert (
        xl_plan(3, ep_size=3, nodes=1, gpus_per_node=6, expert_comm="tokens").expert_comm.chosen == "tokens"
    )
    argv = ["plan", "--model", "Switch-DiT-XL/2", "--ep-size", "3", "--nodes", "1", "--gpus-per-node", "6"]
    assert main(argv) == 0
    assert "tokens 50.33 MB (dispatch and combine), weights 5.31 MB" in capsys.readouterr().out
    mlp = model_config("switch-dit", "XL", 2, num_experts=4, top_k=2, expert_kind="mlp")
    with pytest.raises(UserError, match="expert_comm=weights needs linear experts"):
        make_plan(PlanInputs(mlp, "mlp", ep_size=2, expert_comm="weights"), Hardware(1, 2))
