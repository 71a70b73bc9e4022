"""Heartbeats on a real TCP store: a rank that registered and then fell silent is named.

The two-host Slurm tests (test_multinode.py) stop and kill real ranks; these run anywhere.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap

import torch.distributed as dist

from switchdit_dist.train.distributed import free_port
from switchdit_dist.train.heartbeat import _PREFIX, EXIT_PEER_LOST, LOST_RECORD, Heartbeat, beat_interval


def serve(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=30))


def register_silent_peer(store: dist.TCPStore, rank: int, host: str, pid: int) -> None:
    """What a rank does at start-up, then nothing more: as if it was stopped right after."""
    store.set(f"{_PREFIX}/host/{rank}", f"{host} {pid}")
    store.add(f"{_PREFIX}/beat/{rank}", 1)


def test_the_interval_stays_well_inside_the_timeout():
    assert beat_interval(600) == 5.0
    assert beat_interval(15) == 1.5
    assert beat_interval(1) == 0.2


def test_diagnose_names_the_rank_whose_counter_stands_still():
    port = free_port()
    store = serve(port)
    register_silent_peer(store, 1, "node2", 4242)
    beat = Heartbeat(rank=0, world_size=2, timeout_s=2.0, addr="127.0.0.1", port=port)
    beat.start()
    try:
        assert beat.hosts()[1] == ("node2", 4242)
        silent = beat.diagnose()
    finally:
        beat.stop()
    assert [(s.rank, s.host, s.pid) for s in silent] == [(1, "node2", 4242)]


def test_a_silent_peer_ends_the_watching_rank_with_its_name(tmp_path):
    port = free_port()
    store = serve(port)
    register_silent_peer(store, 1, "node2", 4242)
    script = textwrap.dedent(
        f"""
        import time
        from switchdit_dist.train.heartbeat import Heartbeat
        beat = Heartbeat(rank=0, world_size=2, timeout_s=2.0, addr="127.0.0.1", port={port})
        beat.start()
        time.sleep(60)  # the main thread is "in a collective"; the watcher must end the process
        """
    )
    env = dict(os.environ, SWITCHDIT_ATTEMPT_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=50)
    assert out.returncode == EXIT_PEER_LOST, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("switchdit train: error (rank 0): lost rank 1 (host node2, pid 4242): ")
    assert "no heartbeat for" in lines[0] and "parallel.timeout_s=2" in lines[0]
    record = json.loads((tmp_path / LOST_RECORD).read_text())
    assert (record["rank"], record["host"], record["noticed_by"]) == (1, "node2", 0)


def test_ranks_that_keep_beating_are_not_reported():
    port = free_port()
    store = serve(port)
    beats = [Heartbeat(rank=r, world_size=2, timeout_s=2.0, addr="127.0.0.1", port=port) for r in (1, 0)]
    for beat in beats:
        register_silent_peer(store, beat.rank, "localhost", os.getpid())  # start() waits for both
    for beat in beats:
        beat.start()
    try:
        assert beats[1].diagnose() == []
    finally:
        for beat in beats:
            beat.stop()
