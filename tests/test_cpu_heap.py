"""bench's CPU heap setting: with freed memory kept, a freed block's pages serve the next tensor."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A 24 MiB tensor, freed, then a 20 MiB one. glibc's default maps the first block of its own
# (above its starting threshold) and unmaps it on free, so the second one's pages are new to the
# process: about 5120 page faults. With the heap kept both come from the heap and the second
# reuses the first one's pages.
PROGRAM = """
import sys, torch
from switchdit_dist.bench.cpu_heap import keep_freed_memory, minor_page_faults
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.empty(6 * 2**20).fill_(1.0)
before = minor_page_faults()
torch.empty(5 * 2**20).fill_(1.0)
print(minor_page_faults() - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_kept_heap_serves_freed_blocks_again_without_faults():
    released, kept = faults("release"), faults("keep")
    assert released > 1000  # 5120 pages of 4 KiB (fewer with huge pages)
    assert kept < released / 10
