"""Skip optimizer steps whose gradients are not finite, with one decision for all ranks.

The guard wraps the torch optimizer that DeepSpeed drives. Its ``step`` looks at the gradients
this rank holds (all of them under ZeRO 0, its partition under ZeRO 1/2), agrees with every other
rank through one all-reduce, and either steps or skips and clears the gradients. Checking inside
the optimizer covers every ZeRO stage and precision the same way (DeepSpeed itself skips only
under some of them), and the trainer reads ``last_step_skipped`` to leave the EMA alone too.

The same all-reduce carries one more small integer per rank, ``piggyback()`` (the trainer's stop
request), so that the two per-step decisions cost one collective and one host read together; the
agreed value waits in ``take_piggyback()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from switchdit_dist.train import comm


def _local_nonfinite(optimizer: torch.optim.Optimizer, where: torch.device) -> torch.Tensor:
    """1 if any gradient this rank holds is not finite, else 0: an int64 scalar on ``where``,
    computed without reading it on the host."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.int64, device=where)
    norms = torch._foreach_norm(grads)
    bad = ~torch.isfinite(torch.stack([n.float() for n in norms])).all()
    return bad.to(device=where, dtype=torch.int64)


def make_guarded(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` (so DeepSpeed still sees e.g. an AdamW) with the guard."""

    class Guarded(optimizer_cls):
        last_step_skipped = False
        piggyback: Callable[[], int] | None = None
        _agreed_piggyback: int | None = None

        def step(self, closure=None):
            where = comm.device()
            extra = self.piggyback() if self.piggyback is not None else 0
            flags = torch.stack(
                [_local_nonfinite(self, where), torch.full((), extra, dtype=torch.int64, device=where)]
            )
            skip, self._agreed_piggyback = comm.max_ints_on_device(flags)
            skip = bool(skip)
            self.last_step_skipped = skip
            if skip:
                self.zero_grad(set_to_none=True)
                return None
            return super().step(closure)

        def take_piggyback(self) -> int | None:
            """The maximum of ``piggyback()`` over the ranks at the last step, once; None if no
            step ran since (the caller then agrees by itself)."""
            value, self._agreed_piggyback = self._agreed_piggyback, None
            return value

    Guarded.__name__ = f"FiniteGuarded{optimizer_cls.__name__}"
    Guarded.__qualname__ = Guarded.__name__
    return Guarded
