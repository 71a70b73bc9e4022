"""Model FLOPs per image, counted from the matrix multiplications (2 FLOPs per multiply-add).

Used for MFU and for the planner. Elementwise work (norms, activations, softmax) is left out, as
is usual for MFU; attention's two L x L products are counted.
"""

from __future__ import annotations

from switchdit_dist.models.dit import DiTConfig
from switchdit_dist.models.registry import is_moe


def forward_flops_per_image(config: DiTConfig) -> float:
    d, depth = config.hidden_size, config.depth
    tokens = config.num_patches
    patch_in = config.in_channels * config.patch_size**2
    macs = tokens * patch_in * d  # patch embedding
    macs += 256 * d + d * d  # timestep MLP
    per_block = tokens * (4 * d * d + 2 * d * int(d * config.mlp_ratio))  # qkv + proj + MLP
    per_block += 2 * tokens * tokens * d  # scores and weighted values
    per_block += 6 * d * d  # adaLN modulation
    if is_moe(config):
        if config.expert_kind == "linear":
            expert_macs = tokens * d * d
        else:
            expert_macs = 2 * tokens * d * int(d * config.expert_mlp_ratio)
        per_block += config.top_k * expert_macs + d * config.num_experts
    macs += depth * per_block
    macs += 2 * d * d + tokens * d * config.patch_size**2 * config.out_channels  # final layer
    return 2.0 * macs


def train_flops_per_image(config: DiTConfig) -> float:
    """Forward + backward (backward counted as twice the forward)."""
    return 3.0 * forward_flops_per_image(config)
