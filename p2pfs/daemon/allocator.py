"""The C allocator's settings for a long-lived daemon (glibc only; elsewhere nothing).

A join of a big folder frees and allocates many large blocks (a batch's records, msgpack
buffers, chunk payloads) from a dozen threads. With glibc's defaults the threshold above
which a block gets its own mapping rises after each such block is freed (up to 32 MiB), so
later big blocks land in the heaps and leave holes the next batch does not fit into, and
each thread that allocates gets a heap of its own: in a 50k-file join B's malloc held
40 MiB free (of 86 MiB) at its peak. A fixed mapping threshold and two heaps held 7 MiB
free, for a peak of 155 MiB instead of 183, the join as fast.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024
"""glibc's initial value, kept fixed (setting it turns the adaptive rise off)."""
ARENA_MAX = 2


def tune_allocator() -> bool:
    """Fix glibc's mapping threshold and cap its heaps; call before threads start. Returns
    whether it applied (False on another C library)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): defaults stay
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_ARENA_MAX, ARENA_MAX)
    )
    if not applied:
        logger.info("allocator settings not applied (mallopt refused them)")
    return applied
