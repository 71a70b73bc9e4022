"""Fault injection for tests of crash safety (never set in normal runs).

``SWITCHDIT_INJECT_FAULT`` holds comma-separated ``KIND@STEP[:RANK]`` items, e.g.
``kill9@8:1`` (rank 1 kills itself with SIGKILL during step 8, after its forward pass),
``sigterm@7:0`` (rank 0 sends itself SIGTERM during step 7), ``nan@5:1`` (rank 1's loss at step 5
becomes NaN), ``crash_in_checkpoint@6`` (every rank dies with SIGKILL after writing part of the
step-6 checkpoint), ``checkpoint_write_error@6`` (writing the step-6 checkpoint raises OSError).
Steps are 1-based optimizer steps.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENV = "SWITCHDIT_INJECT_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None


def _parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        faults.append(Fault(kind, int(step), int(rank) if rank else None))
    return faults


class FaultInjector:
    def __init__(self, rank: int):
        self.rank = rank
        self.faults = _parse(os.environ.get(ENV, ""))

    def active(self, kind: str, step: int) -> bool:
        return any(f.kind == kind and f.step == step and f.rank in (None, self.rank) for f in self.faults)

    def during_step(self, step: int) -> None:
        if self.active("kill9", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.active("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self.active("sigusr2", step):
            os.kill(os.getpid(), signal.SIGUSR2)
