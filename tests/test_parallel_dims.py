"""The parallel layout's derived sizes and rules (config, plan and submit word its messages)."""

from __future__ import annotations

import pytest

from switchdit_dist.errors import UserError
from switchdit_dist.parallel_dims import PLAN_FLAGS, LayoutError, ParallelDims, num_local_experts


def test_sizes_of_a_two_node_expert_parallel_job():
    dims = ParallelDims(world_size=16, ep_size=4, num_experts=8, micro_batch=2, global_batch=64)
    dims.check()
    assert (dims.data_parallel, dims.expert_data_parallel, dims.num_local_experts) == (16, 4, 2)
    assert (dims.per_forward, dims.accumulation) == (32, 2)
    assert [list(g) for g in dims.ep_groups()] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
    ]
    assert dims.check_nodes(8) is None
    assert "spans 2 nodes" in ParallelDims(16, 4, 8).check_nodes(2)


def test_a_dense_model_has_no_experts_and_no_expert_parallelism():
    dims = ParallelDims(world_size=4, micro_batch=8)
    dims.check()
    assert (dims.is_moe, dims.num_local_experts, dims.accumulation) == (False, 0, 1)
    with pytest.raises(LayoutError, match=r"ep-size 2 needs a mixture-of-experts model \(Switch-DiT\)"):
        ParallelDims(world_size=4, ep_size=2).check(PLAN_FLAGS)


@pytest.mark.parametrize(
    "dims, message",
    [
        (
            ParallelDims(4, 3, 4),
            r"parallel\.ep_size=3 does not divide model\.num_experts=4; .* among \[1, 2, 4\]",
        ),
        (ParallelDims(6, 4, 8), r"parallel\.ep_size=4 does not divide the world size 6"),
        (ParallelDims(4, 2, 4, 2, 12), r"train\.global_batch=12 is not a multiple of .* = 2 x 4 = 8"),
        (
            ParallelDims(4, 2, 4, 2, 10),
            r"train\.global_batch=10 is not divisible by the data-parallel size 4",
        ),
        (ParallelDims(4, 0, 4), r"parallel\.ep_size=0: expected >= 1"),
    ],
)
def test_broken_rules_are_user_errors_naming_the_settings(dims, message):
    with pytest.raises(UserError, match=message):
        dims.check()


def test_node_layout_rules():
    with pytest.raises(LayoutError, match="3 ranks per node is not a multiple of parallel.ep_size=2"):
        ParallelDims(6, 2, 4).check_nodes(3)
    with pytest.raises(LayoutError, match="parallel.ep_size=6 is not a multiple of the 4 ranks per node"):
        ParallelDims(12, 6, 6).check_nodes(4)


def test_local_experts_are_a_value_error_for_library_callers():
    assert num_local_experts(8, 4) == 2
    with pytest.raises(
        ValueError, match="num_experts=3 must be divisible by the expert-parallel size ep_size=2"
    ):
        num_local_experts(3, 2)
