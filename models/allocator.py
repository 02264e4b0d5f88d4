"""Keep the memory a scoring process frees, so that the next slice does not fault it back in page by page.

Every U-Net pass allocates and frees tens of full-resolution tensors of 5 to 70 MB. glibc's defaults hand
blocks that large to the kernel (mmap) and give freed heap tops back (trim), so each pass faulted in about
100,000 fresh zeroed pages per 512 x 512 slice: a third of the scoring time was spent in the kernel
(docs/bench/scoring.md). Taking every block from the heap (no mmap: glibc caps the mmap threshold at 32 MB,
and larger blocks were still mapped afresh on some runs) and raising the trim threshold keeps freed blocks
for reuse; the process's peak memory is unchanged (it is the same working set), only not returned between
slices (up to 1 GB of free heap top is kept).

glibc reads the same settings from MALLOC_MMAP_MAX_, MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and
MALLOC_TOP_PAD_: an operator who sets any of them keeps their own choice. Elsewhere (musl, macOS) this does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

log = logging.getLogger("btd.models.allocator")

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 256 << 20  # address space reserved per heap growth; pages are only touched when used
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True when they are in force (glibc, no operator override)."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    overridden = [name for name in OPERATOR_VARIABLES if os.environ.get(name)]
    if overridden:
        log.info("allocator left as the operator set it (%s)", ", ".join(overridden))
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    settings = (
        (M_MMAP_MAX, 0),  # blocks over the largest threshold (32 MB) would still be mapped afresh each time
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_TOP_PAD, TOP_PAD_BYTES),
    )
    return all(mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings)
