"""Keep freed tensor memory in the process, so CPU training stops paying the kernel for pages.

glibc serves every allocation above its mmap threshold (128 kB, rising to at most 32 MB) with a
fresh ``mmap`` and returns it to the kernel on ``free``. At batch 16 x 64 the largest activations
are about 100 MB, so every update faults in and zeroes their 4 kB pages again: 0.54 million page
faults per update at SheepRL's XS shape, 0.19 million at tiny, and an elementwise op on a fresh
100 MB tensor took 8x as long as the same op into a reused buffer. With mmap switched off and the
heap never trimmed, freed blocks are reused and a settled update faults almost never
(benchmarks/agent_speed.py, one sitting, medians of 3: tiny 1.56 -> 1.05 s, 1M 1.73 -> 1.58 s,
small 2.77 -> 2.09 s per update). The cost: the process keeps its peak heap, so peak RSS is 4-16%
higher and resident memory between updates stays at that peak.

``cli.py`` calls ``keep_freed_memory()`` before anything allocates and ``Dreamer`` when it is built
(scripts, benchmarks); ``DREAMER_KEEP_FREED_MEMORY=0`` in the environment leaves the C library's
defaults alone. Only glibc (Linux) is changed; elsewhere this does nothing. Another program gets
the same settings from glibc's environment variables (``GLIBC_ENV`` below), set before it starts.
"""

from __future__ import annotations

import ctypes
import os

ENV = "DREAMER_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
NEVER_TRIM = 2**31 - 1  # the largest trim threshold mallopt takes (an int)
GLIBC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(NEVER_TRIM)}
_applied: bool | None = None


def wanted() -> bool:
    """Whether the environment asks for it (unset or ``1``); ``0`` declines; anything else is refused."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r} is not allowed; use 1 (keep freed memory for reuse, the default) "
                         "or 0 (the C library's defaults)")
    return value == "1"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap, no trimming), once per process.
    Returns whether it is in effect: False where declined or where the C library is not glibc."""
    global _applied
    if _applied is None:
        _applied = wanted() and _mallopt()
    return _applied


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt ignores these settings
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
