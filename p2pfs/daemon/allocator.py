"""The C allocator's settings for a long-lived daemon (glibc only; elsewhere nothing).

A join of a big folder frees and allocates many large blocks (a batch's records, msgpack
buffers, chunk payloads) from a dozen threads, and with glibc's defaults each thread that
allocates gets a heap of its own, whose holes the next batch's blocks do not fill: in a
50k-file join B's malloc held 40 MiB free (of 86 MiB) at its peak. Two heaps keep B's
50k peak at 145 MiB (183 before; the watcher's sifting, engine.py, is in both figures).

glibc's mapping threshold stays adaptive. Fixing it at 128 KiB (tried with the heap cap)
gained nothing more (B 143 vs 145 MiB at 50k, 189 vs 187 MiB at 200k, one run each) and
made every block above it a fresh mapping: a fetch's stream reads and send buffers, whose
pages each fault in anew (10,000 small files 6.05-7.48 s against 5.04-5.55 s adaptive,
alternating, under the lock).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Any, cast

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8
ARENA_MAX = 2


def _glibc_function(name: str, argtypes: tuple[Any, ...]) -> Callable[..., int] | None:
    """glibc's ``name`` typed to return an int; None on another C library (musl has
    neither mallopt nor malloc_trim: its defaults stay)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return cast(Callable[..., int], function)


def tune_allocator() -> bool:
    """Cap glibc's heaps at two; call before threads start. Returns whether it applied
    (False on another C library)."""
    mallopt = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    applied = bool(mallopt(M_ARENA_MAX, ARENA_MAX))
    if not applied:
        logger.info("allocator settings not applied (mallopt refused them)")
    return applied


def release_free_memory() -> bool:
    """Hand the C allocator's free pages back to the system (glibc's ``malloc_trim``):
    freed blocks in the middle of a heap stay resident until reused, and a big block
    allocated next (a folder's index leaves, rebuilt at a join's end) cannot reuse
    scattered ones. Returns whether any memory was released (False on another C library)."""
    trim = _glibc_function("malloc_trim", (ctypes.c_size_t,))
    return trim is not None and bool(trim(0))
