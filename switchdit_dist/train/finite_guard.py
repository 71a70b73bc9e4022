"""Skip optimizer steps whose gradients are not finite, with one decision for all ranks.

The guard wraps the torch optimizer that DeepSpeed drives. Its ``step`` looks at the gradients
this rank holds (all of them under ZeRO 0, its partition under ZeRO 1/2), agrees with every other
rank through one all-reduce, and either steps or skips and clears the gradients. Checking inside
the optimizer covers every ZeRO stage and precision the same way (DeepSpeed itself skips only
under some of them), and the trainer reads ``last_step_skipped`` to leave the EMA alone too.
"""

from __future__ import annotations

import torch

from switchdit_dist.train.comm import any_rank


def _local_nonfinite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return False
    norms = torch._foreach_norm(grads)
    return not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def make_guarded(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` (so DeepSpeed still sees e.g. an AdamW) with the guard."""

    class Guarded(optimizer_cls):
        last_step_skipped = False

        def step(self, closure=None):
            skip = any_rank(_local_nonfinite(self))
            self.last_step_skipped = skip
            if skip:
                self.zero_grad(set_to_none=True)
                return None
            return super().step(closure)

    Guarded.__name__ = f"FiniteGuarded{optimizer_cls.__name__}"
    Guarded.__qualname__ = Guarded.__name__
    return Guarded
