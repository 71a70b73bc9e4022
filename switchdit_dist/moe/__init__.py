"""Expert parallelism: where the model's experts meet process groups and DeepSpeed's MoE machinery."""

from switchdit_dist.moe.dispatch import DispatchPlan, all_to_all_variable, plan_dispatch
from switchdit_dist.moe.layer import ExpertParallelMoE, expert_parallel_factory

__all__ = [
    "DispatchPlan",
    "ExpertParallelMoE",
    "all_to_all_variable",
    "expert_parallel_factory",
    "plan_dispatch",
]
