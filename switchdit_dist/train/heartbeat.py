"""Peer liveness: every rank beats on the rendezvous store, and a rank that falls silent is named.

A rank that dies, is stopped (SIGSTOP, a frozen host) or loses its host leaves its peers inside a
collective. They wait for the process-group timeout and then report a closed socket or a timed-out
operation, neither of which says who is gone. Here a thread in every rank bumps a counter on the
TCP store the process group was created on (``MASTER_ADDR:MASTER_PORT``; torchrun's agent or rank
0 serve it) every ``interval`` seconds. Rank 0 watches every rank's counter and the others watch
rank 0's, which keeps the store traffic linear in the number of ranks. A counter that has not moved
for ``parallel.timeout_s`` ends the watching rank with a message that names the silent rank and its
host. Counters, not clocks, are compared, so hosts need no synchronised time.

The thread keeps beating while the main thread waits in a collective or writes a checkpoint (torch
releases the GIL there), so only a process that stopped running falls silent.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

# Exit code of a rank that ended because a peer fell silent (the SLURM script reports the peer).
EXIT_PEER_LOST = 4
# The file (in the SLURM attempt's log folder) naming the lost rank for the batch script.
LOST_RECORD = "lost-rank.json"
_PREFIX = "switchdit/heartbeat"


def beat_interval(timeout_s: float) -> float:
    """Often enough to notice a silent peer well within the timeout, at most every 5 s."""
    return max(0.2, min(5.0, timeout_s / 10))


@dataclass
class SilentRank:
    rank: int
    host: str
    pid: int
    silent_s: float

    def describe(self) -> str:
        return f"rank {self.rank} (host {self.host}, pid {self.pid})"


class Heartbeat:
    def __init__(self, rank: int, world_size: int, timeout_s: float, addr: str, port: int):
        self.rank, self.world_size = rank, world_size
        self.timeout_s = float(timeout_s)
        self.interval = beat_interval(self.timeout_s)
        self._addr, self._port = addr, port
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hosts: dict[int, tuple[str, int]] = {}
        self._watched = list(range(world_size)) if rank == 0 else [0]
        self._client = None

    @classmethod
    def from_env(cls, rank: int, world_size: int, timeout_s: float) -> Heartbeat:
        return cls(rank, world_size, timeout_s, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))

    # --- the store ---------------------------------------------------------------------------

    def _store(self):
        # Its own client connection: the process group's store is busy with the group's own keys.
        return dist.TCPStore(
            self._addr,
            self._port,
            is_master=False,
            timeout=datetime.timedelta(seconds=max(self.timeout_s, 1.0)),
            wait_for_workers=False,
        )

    def _counters(self, store, ranks: list[int]) -> list[int]:
        values = store.multi_get([f"{_PREFIX}/beat/{r}" for r in ranks])
        return [int(v) for v in values]

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Register this rank's host and start beating; returns once every rank has registered."""
        self._client = self._store()
        host = socket.gethostname().split(".")[0]
        self._client.set(f"{_PREFIX}/host/{self.rank}", f"{host} {os.getpid()}")
        self._client.add(f"{_PREFIX}/beat/{self.rank}", 1)
        self._client.wait([f"{_PREFIX}/beat/{r}" for r in range(self.world_size)])
        self.hosts()  # known up front: a silent rank is named even when the store is gone
        self._thread = threading.Thread(target=self._run, name="switchdit-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating (before the final barrier: afterwards ranks leave at different times)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)
            self._thread = None

    def hosts(self) -> dict[int, tuple[str, int]]:
        """Host name and PID of every rank."""
        if len(self._hosts) < self.world_size and self._client is not None:
            keys = [f"{_PREFIX}/host/{r}" for r in range(self.world_size)]
            for r, value in enumerate(self._client.multi_get(keys)):
                name, pid = value.decode().split()
                self._hosts[r] = (name, int(pid))
        return self._hosts

    def _run(self) -> None:
        store = self._store()
        last_values = [-1] * len(self._watched)
        last_change = [time.monotonic()] * len(self._watched)
        store_since = None  # when the store stopped answering, if it did
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                store.add(f"{_PREFIX}/beat/{self.rank}", 1)
                values = self._counters(store, self._watched)
                store_since = None
            except Exception:  # the store lives with rank 0 (or the launcher): it is gone or stuck
                store_since = store_since or now
                if now - store_since > self.timeout_s and not self._stop.is_set():
                    self._abort([SilentRank(0, *self._hosts.get(0, ("?", 0)), now - store_since)])
                continue
            silent = []
            for i, value in enumerate(values):
                if value != last_values[i]:
                    last_values[i], last_change[i] = value, now
                elif now - last_change[i] > self.timeout_s:
                    silent.append(self._silent(self._watched[i], now - last_change[i]))
            if silent and not self._stop.is_set():
                self._abort(silent)

    def _silent(self, rank: int, seconds: float) -> SilentRank:
        host, pid = self._hosts.get(rank, ("?", 0))
        return SilentRank(rank, host, pid, seconds)

    # --- diagnosis ---------------------------------------------------------------------------

    def diagnose(self) -> list[SilentRank]:
        """After a failed collective: the ranks whose counters stand still for three beats."""
        try:
            store = self._store()
            ranks = list(range(self.world_size))
            before = self._counters(store, ranks)
            time.sleep(3 * self.interval)
            after = self._counters(store, ranks)
        except Exception:
            return [self._silent(0, 3 * self.interval)]  # the store's host is gone
        return [self._silent(r, 3 * self.interval) for r, a, b in zip(ranks, before, after) if a == b]

    def report(self, silent: list[SilentRank], cause: str) -> str:
        """One message naming the silent ranks; also written for the SLURM script."""
        names = ", ".join(s.describe() for s in silent)
        message = (
            f"switchdit train: error (rank {self.rank}): lost {names}: {cause}. It stopped, hung or its "
            f"host was lost; ending the job (the latest complete checkpoint is kept; resubmit to resume)"
        )
        attempt_dir = os.environ.get("SWITCHDIT_ATTEMPT_DIR")
        if attempt_dir:
            first = silent[0]
            record = {"rank": first.rank, "host": first.host, "noticed_by": self.rank, "cause": cause}
            try:
                with open(os.path.join(attempt_dir, LOST_RECORD), "x") as f:  # the first report wins
                    f.write(json.dumps(record) + "\n")
            except OSError:
                pass
        return message

    def _abort(self, silent: list[SilentRank]) -> None:
        longest = max(s.silent_s for s in silent)
        cause = f"no heartbeat for {longest:.0f} s (parallel.timeout_s={self.timeout_s:g})"
        print(self.report(silent, cause), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The main thread is blocked in a collective that will not return: end the process here.
        os._exit(EXIT_PEER_LOST)
