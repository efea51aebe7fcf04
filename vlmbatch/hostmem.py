"""Host memory: glibc's malloc set up for a CPU engine, which frees and reallocates the same
activations every step.

glibc hands out blocks above its mmap threshold (128 KiB at first, raised as such blocks are freed,
but never past 32 MiB) as fresh mappings and unmaps them on free, and it returns freed memory at the
top of its heap to the kernel once more than its trim threshold is free there. Either way the next
step's activations land on pages the kernel has to fault in and zero again: in a profile of the CPU
workload a GELU over a 6 MB tensor took 2.96 ms in the run against 0.16 ms on a warm buffer, and the
process spent a tenth of its time in the kernel. With every block under 256 MiB served from the heap
and the heap trimmed only past 1 GiB free, freed activations are reused as they are; the same sizes
recur step after step, so host memory stays flat over a long run (eval/bench_memory.py).

A process started with glibc's own malloc settings (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
or glibc.malloc tunables in GLIBC_TUNABLES) keeps them: that is also how to switch this off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse instead of returning them to the kernel
    (once per process). True where it took; False where the environment sets malloc up itself and on
    other C libraries and systems, where it does nothing."""
    settings = {M_MMAP_THRESHOLD: MMAP_THRESHOLD, M_TRIM_THRESHOLD: TRIM_THRESHOLD}
    return not user_tuned_malloc() and _mallopt(settings)


def user_tuned_malloc(environ=os.environ) -> bool:
    """Whether the process was started with glibc malloc settings of its own."""
    return ("MALLOC_MMAP_THRESHOLD_" in environ or "MALLOC_TRIM_THRESHOLD_" in environ
            or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""))


def _mallopt(params: dict[int, int]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library's; a non-glibc one refuses or has none
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # A list, not a generator: every setting is applied even if one is refused.
    return all([mallopt(param, value) == 1 for param, value in params.items()])
