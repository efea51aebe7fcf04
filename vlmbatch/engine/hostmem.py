"""Host memory: glibc's malloc set up for a CPU engine, which frees and reallocates the same
activations every step.

By default glibc unmaps large freed blocks and trims its heap, so each step's activations land on
pages the kernel must fault in and zero again. Serving blocks under 256 MiB from the heap and trimming
it only past 1 GiB free lets freed activations be reused; the sizes recur every step, so host memory
stays flat (eval/bench_memory.py; figures in eval/RESULTS.md). A process started with glibc's own
malloc settings (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, glibc.malloc tunables in
GLIBC_TUNABLES) keeps them: that is also how to switch this off.
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
