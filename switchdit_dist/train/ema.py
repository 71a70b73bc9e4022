"""Exponential moving average of the weights, kept where the weights live.

Each rank averages the parameters it holds: the replicated (non-expert) ones, identical on every
rank, and its own experts only. The average is never gathered whole during training; checkpoints
store it per owner (see ``checkpoint.py``), one full fp32 tensor per parameter name.

The average is taken of the fp32 master weights where DeepSpeed keeps them apart from the module
(bf16 training; ``engine.fp32_masters``), not of the bf16 module weights, which are the masters
rounded to 8 significant bits: with AdamW at lr 1e-4 a step moves a weight of 0.02 by about one
bf16 spacing or less, so the rounded copy lags and jumps, and its average carries that rounding
(measured on the tiny model, bf16 ZeRO-2: 9e-5 off the fp32 average after 4 steps, against 2e-8
from the masters; ``tests/test_ema.py``). Under ZeRO 1/2 each rank holds one fragment of every
master, and averages only that fragment: no communication per step and 1/DP of the memory.
``state_dict`` then assembles full tensors (one all-reduce per parameter group, at checkpoint time),
and ``load_state_dict`` takes full tensors and keeps this rank's fragments. In fp32 the module's
weights are the masters, and the average is taken of them as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from switchdit_dist.train import comm

if TYPE_CHECKING:
    from switchdit_dist.train.engine import MasterSlice

# Elements per all-reduce when a partitioned average is assembled: bounds the extra device memory.
_GATHER_BUCKET = 1 << 26


class EMA:
    def __init__(self, model: nn.Module, decay: float, masters: dict[str, MasterSlice] | None = None):
        """``masters`` (from ``engine.fp32_masters``): where each parameter's fp32 master is; the
        parameters it does not name are averaged from the module (fp32 weights, frozen ones)."""
        self.decay = decay
        self.masters = dict(masters or {})
        self.shapes = {name: p.shape for name, p in model.named_parameters()}
        # a parameter's average: its full shape, or this rank's flat fragment if partitioned
        self.shadow: dict[str, torch.Tensor] = {
            name: self._source(name, p).float().clone() for name, p in model.named_parameters()
        }

    @classmethod
    def from_engine(cls, engine, decay: float) -> EMA:
        """The average of a DeepSpeed engine's module, taken from its fp32 masters where it has them."""
        from switchdit_dist.train.engine import fp32_masters

        return cls(engine.module, decay, fp32_masters(engine))

    def _source(self, name: str, p: torch.Tensor) -> torch.Tensor:
        master = self.masters.get(name)
        if master is None:
            return p.detach()
        value = master.read()
        return value if master.partitioned else value.view(p.shape)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadows, params = [], []
        for name, p in model.named_parameters():
            shadow = self.shadow[name]
            if shadow.numel() == 0:  # another rank holds all of this parameter's master
                continue
            shadows.append(shadow)
            params.append(self._source(name, p).float())
        if shadows:
            torch._foreach_lerp_(shadows, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 tensors by parameter name. Collective when the average is partitioned: every
        rank of the data-parallel group must call it (the checkpoint does, on every rank); the
        assembled tensors are then returned on the CPU, so a checkpoint does not hold a second full
        fp32 model on the GPU."""
        if not any(m.partitioned for m in self.masters.values()):
            return dict(self.shadow)
        out: dict[str, torch.Tensor] = {}
        # by group, in parameter order: the same sequence of collectives on every rank
        pending: dict[int, tuple[object, list[str]]] = {}
        for name, shadow in self.shadow.items():
            master = self.masters.get(name)
            if master is None or not master.partitioned:
                out[name] = shadow
            else:
                pending.setdefault(id(master.group), (master.group, []))[1].append(name)
        for group, names in pending.values():
            bucket: list[str] = []
            size = 0
            for name in names:
                bucket.append(name)
                size += self.shapes[name].numel()
                if size >= _GATHER_BUCKET:
                    out.update(self._assemble(bucket, group))
                    bucket, size = [], 0
            if bucket:
                out.update(self._assemble(bucket, group))
        return {name: out[name] for name in self.shadow}

    def _assemble(self, names: list[str], group) -> dict[str, torch.Tensor]:
        fulls = []
        for name in names:
            shadow, master = self.shadow[name], self.masters[name]
            full = torch.zeros(self.shapes[name].numel(), dtype=torch.float32, device=shadow.device)
            full.narrow(0, master.start, master.numel).copy_(shadow)
            fulls.append(full)
        comm.all_reduce_sum(fulls, group)  # each element is non-zero on the one rank that holds it
        return {name: full.view(self.shapes[name]).cpu() for name, full in zip(names, fulls)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Full tensors by parameter name (as ``state_dict`` returns); local, no collective."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for name, value in state.items():
            if name not in self.shadow:
                continue
            master = self.masters.get(name)
            if master is not None and master.partitioned:
                value = value.reshape(-1).narrow(0, master.start, master.numel)
            self.shadow[name].copy_(value)
