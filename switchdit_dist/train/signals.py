"""Stop requests from signals, agreed on by all ranks at a step boundary.

SIGUSR2 is SLURM's early warning before a time limit or preemption (USR1 is avoided because
NCCL may use it); SIGTERM comes from scancel, preemption without warning or the launcher;
SIGINT from Ctrl-C. A handler only records the request: the training loop checks it between
steps with one all-reduce (the optimizer guard's, see ``finite_guard``), so every rank stops after
the same step and writes the same checkpoint.
"""

from __future__ import annotations

import signal

from switchdit_dist.train import comm

# Exit codes after a signal-triggered checkpoint. 3 tells the SLURM script to requeue the job.
EXIT_REQUEUE = 3
EXIT_CODES = {
    signal.SIGUSR2: EXIT_REQUEUE,
    signal.SIGTERM: 128 + signal.SIGTERM,
    signal.SIGINT: 128 + signal.SIGINT,
}
# Precedence when ranks disagree, so that a maximum picks TERM/INT over the early warning.
_ORDER = {0: 0, int(signal.SIGUSR2): 1, int(signal.SIGINT): 2, int(signal.SIGTERM): 3}
_BY_ORDER = {v: k for k, v in _ORDER.items()}


class StopRequest:
    def __init__(self) -> None:
        self.signum = 0
        self._previous = {}

    def install(self) -> None:
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # Keep the most urgent request: TERM/INT win over the early warning.
        if self.signum == 0 or signum != signal.SIGUSR2:
            self.signum = signum

    def order(self) -> int:
        """This rank's request as its precedence (0: none), for an agreement by maximum."""
        return _ORDER[int(self.signum)]

    def agreed(self, order: int | None = None) -> int:
        """The signal any rank received (0 if none), identical on every rank. ``order``: the
        maximum of ``order()`` over the ranks when another collective already carried it (the
        optimizer guard's); otherwise this agrees with one all-reduce of its own."""
        if order is None:
            order = comm.max_int(self.order())
        return _BY_ORDER[order]
