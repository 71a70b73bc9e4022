"""Switch-DiT (Park et al., ECCV 2024): DiT with a timestep-gated sparse mixture of experts per block.

Per block, a router sees only the timestep embedding e_t: ``probs = softmax(Linear(SiLU(e_t)))``;
the top-k experts are applied to every token of the sample, weighted by their full softmax
probability (not renormalised). Their sum ``out(x)`` becomes a channel mask ``m = 1 + out(x)``::

    r = x * m
    r = r + gate_msa * Attn(mod(norm1(r)))
    r = r + gate_mlp * MLP(mod(norm2(r)))
    x = r + (1 - m) * x

Experts start at zero, so m = 1 and the model equals DiT exactly at initialisation.

The experts module is injected (``experts_factory``) so the same model runs with all experts
local or with the expert-parallel layer from ``switchdit_dist.moe``; this file knows nothing of
process groups.

Because the gate depends on t alone, a caller that knows the timesteps can decide the routes of
every block before the forward (``route_table``) and hand them in as ``Routes``; the forward then
uses them instead of its own top-k, and experts modules that take them get the per-expert sample
counts too, so nothing inside the forward has to read routing decisions back from the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from switchdit_dist.models.dit import DiT, DiTBlock, DiTConfig
from switchdit_dist.models.experts import EXPERT_KINDS, LocalExperts


@dataclass
class SwitchDiTConfig(DiTConfig):
    num_experts: int = 3
    top_k: int = 2
    expert_kind: str = "linear"
    expert_mlp_ratio: float = 4.0
    prior_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.expert_kind not in EXPERT_KINDS:
            raise ValueError(f"expert_kind must be one of {EXPERT_KINDS}, got {self.expert_kind!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")


ExpertsFactory = Callable[[SwitchDiTConfig, int], nn.Module]


@dataclass
class Routes:
    """A batch's routing in every block, decided before the forward.

    ``index`` [B, depth, k]: each sample's top-k experts per block, on the model's device.
    ``expert_counts``: per block, what the experts module needs to place the samples without
    reading ``index`` back from the device (the expert-parallel layer takes its group's samples
    per expert, on the host, as ``expert_counts``); None when the experts need nothing.
    """

    index: torch.Tensor
    expert_counts: Sequence[object] | None = None


def local_experts_factory(config: SwitchDiTConfig, block_index: int) -> nn.Module:
    return LocalExperts(config.hidden_size, config.num_experts, config.expert_kind, config.expert_mlp_ratio)


class TimestepRouter(nn.Module):
    """softmax(Linear(SiLU(e_t))) over experts, and its top-k (weights are the full probabilities)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_experts, bias=True))

    def probs(self, t_emb: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.gate(t_emb).float(), dim=-1)

    def forward(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = self.probs(t_emb)
        weight, index = probs.topk(self.top_k, dim=-1)
        return probs, index, weight


class SwitchDiTBlock(DiTBlock):
    def __init__(self, config: SwitchDiTConfig, experts: nn.Module):
        super().__init__(config.hidden_size, config.num_heads, config.mlp_ratio)
        self.router = TimestepRouter(config.hidden_size, config.num_experts, config.top_k)
        self.moe = experts

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        t_emb: torch.Tensor,
        index: torch.Tensor | None = None,
        expert_counts: object | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``index`` [B, k]: routes decided by the caller (the router's own top-k otherwise);
        the weights are always the router's probabilities of those experts, so they keep their
        gradient."""
        if index is None:
            probs, index, weight = self.router(t_emb)
        else:
            probs = self.router.probs(t_emb)
            weight = probs.gather(-1, index)
        extra = {} if expert_counts is None else {"expert_counts": expert_counts}
        # With m = 1 + out: x * m = x + x * out and (1 - m) * x = -(x * out). One product shared by
        # both ends: three full-size elementwise ops instead of five, forward and backward alike.
        x_out = x * self.moe(x, index, weight.to(x.dtype), **extra)
        r = self.residual_branches(x + x_out, c)
        return r - x_out, probs


class SwitchDiT(DiT):
    """``forward(x, t, y)`` -> network output; ``return_gates=True`` also returns the gate
    probabilities [B, depth, E] that the diffusion prior loss needs; ``routes`` (see ``Routes``)
    replaces the routers' own top-k."""

    config: SwitchDiTConfig

    def __init__(self, config: SwitchDiTConfig, experts_factory: ExpertsFactory = local_experts_factory):
        self._experts_factory = experts_factory
        super().__init__(config)

    def make_blocks(self) -> list[nn.Module]:
        c = self.config
        return [SwitchDiTBlock(c, self._experts_factory(c, i)) for i in range(c.depth)]

    def owns_its_init(self, name: str) -> bool:
        # Experts keep their own (zero) init, and skipping them keeps the random stream of every
        # other weight independent of how many experts a rank holds: the same seed gives the same
        # model on any expert-parallel layout.
        return ".moe." in f".{name}."

    def initialize_weights(self) -> None:
        super().initialize_weights()  # xavier for every linear but the experts; the router included
        for block in self.blocks:
            for module in block.moe.modules():
                if hasattr(module, "reset_expert_parameters"):
                    module.reset_expert_parameters()

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        return_gates: bool = False,
        routes: Routes | None = None,
    ):
        tokens, c, t_emb = self.embed(x, t, y)
        gates = []
        for i, block in enumerate(self.blocks):
            if routes is None:
                tokens, probs = block(tokens, c, t_emb)
            else:
                counts = None if routes.expert_counts is None else routes.expert_counts[i]
                tokens, probs = block(tokens, c, t_emb, routes.index[:, i], counts)
            gates.append(probs)
        out = self.unpatchify(self.final_layer(tokens, c))
        if return_gates:
            return out, torch.stack(gates, dim=1)
        return out

    @torch.no_grad()
    def gate_probs_for_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Router probabilities of every block for the given timesteps: [T, depth, E]."""
        t_emb = self.t_embedder(timesteps)
        return torch.stack([block.router.probs(t_emb) for block in self.blocks], dim=1)

    @torch.no_grad()
    def route_table(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Every block's top-k experts for the given timesteps: [T, depth, k] expert ids."""
        return self.gate_probs_for_timesteps(timesteps).topk(self.config.top_k, dim=-1).indices
