"""``parallel.expert_comm``: how a layer's samples meet its experts, and the byte cost model that
``auto`` decides by (``switchdit plan`` prints it). Plain arithmetic on the model's config, kept out
of ``switchdit_dist.moe`` so that the config checks and the planner do not import DeepSpeed.

Per block and forward pass one EP rank sends, with ``tokens``, its (sample, slot) blocks out and
their expert outputs back (two all-to-alls of micro_batch x L x D x k values, (P-1)/P of them
leaving the rank), and, with ``weights``, its own experts to the other ranks (one all-gather:
E x (D^2 + D) x (P-1)/P values). The backward pass moves as many again in each case (the reverse
all-to-alls; one reduce-scatter of the expert gradients), so the forward figures compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EXPERT_COMMS = ("auto", "tokens", "weights")


def check_expert_comm(mode: str, kind: str, allowed: tuple[str, ...] = EXPERT_COMMS) -> None:
    """ValueError unless ``mode`` is one of ``allowed`` and fits experts of ``kind``."""
    if mode not in allowed:
        raise ValueError(f"expert_comm: expected one of {', '.join(allowed)}, got {mode!r}")
    if mode == "weights" and kind != "linear":
        raise ValueError(
            f"expert_comm=weights needs linear experts, not {kind!r} ones (they are mixed per sample): "
            "use tokens or auto"
        )


@dataclass(frozen=True)
class ExpertCommCost:
    """Bytes one EP rank sends per block in one forward pass (the backward pass sends as many)."""

    tokens: int
    weights: int

    def choice(self, kind: str, ep_size: int) -> str:
        """What ``auto`` picks: weights for linear experts (they mix; at EP 1 nothing moves and
        one matmul replaces k) when they are no more bytes than the tokens; tokens otherwise."""
        if kind != "linear":
            return "tokens"
        return "weights" if ep_size == 1 or self.weights <= self.tokens else "tokens"


def expert_comm_bytes(model: Any, micro_batch: int, ep_size: int, bytes_per_value: int) -> ExpertCommCost:
    """The cost model for a Switch-DiT config ``model``, with uniform routing for token dispatch."""
    leaving = (ep_size - 1) / ep_size
    # Dispatch and combine: every (sample, slot) block travels out to its expert and back.
    token_values = 2 * micro_batch * model.top_k * model.num_patches * model.hidden_size * leaving
    weight_values = model.num_experts * (model.hidden_size**2 + model.hidden_size) * leaving
    return ExpertCommCost(int(token_values * bytes_per_value), int(weight_values * bytes_per_value))


def resolve_expert_comm(mode: str, model: Any, micro_batch: int, ep_size: int, bytes_per_value: int) -> str:
    """``tokens`` or ``weights`` for the layers of ``model``, from ``parallel.expert_comm``."""
    check_expert_comm(mode, model.expert_kind)
    if mode != "auto":
        return mode
    return expert_comm_bytes(model, micro_batch, ep_size, bytes_per_value).choice(model.expert_kind, ep_size)
