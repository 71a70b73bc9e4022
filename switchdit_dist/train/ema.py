"""Exponential moving average of the weights, kept where the weights live.

Each rank averages the parameters it holds: the replicated (non-expert) ones, identical on every
rank, and its own experts only. The average is never gathered whole during training; checkpoints
store it per owner (see ``checkpoint.py``).
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadows, params = [], []
        for name, p in model.named_parameters():
            shadows.append(self.shadow[name])
            params.append(p.detach().float())
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for name, value in state.items():
            if name in self.shadow:
                self.shadow[name].copy_(value)
