"""Keep freed CPU memory in the process for the benchmarks' timed steps.

glibc's malloc hands large freed blocks back to the kernel (``munmap``, heap trimming), so a
model's step touches many of its activations' pages afresh: up to tens of thousands of minor page
faults per step at Switch-DiT-S/2 on a CPU, more for the model with more activations. A CUDA run
has no such cost (the caching allocator keeps its blocks). ``keep_freed_memory`` asks glibc,
through ``mallopt``, to serve blocks up to 32 MiB (glibc's ceiling for this setting) from the heap,
never to trim it and to grow it a GiB at a time, as the caching allocator keeps its blocks, so that
a CPU benchmark compares the models' work rather than the kernel's page zeroing.
``minor_page_faults`` lets a benchmark show what is left.

Written by hand: glibc's tunables are environment variables read at process start, too late
for a command that is already running; ``mallopt`` is their documented run-time form.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_MMAP_THRESHOLD = 32 * 2**20  # the most glibc takes on 64-bit: larger blocks are still mapped
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int): 2 GiB free at the top stays
_TOP_PAD = 2**30


def keep_freed_memory() -> bool:
    """True if glibc took the settings; False elsewhere (another C library: nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, _NEVER_TRIM),
        (_M_TOP_PAD, _TOP_PAD),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)


def minor_page_faults() -> int:
    """This process's minor page faults so far (``getrusage``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
