"""The daemon's C allocator settings and its release of free memory (glibc)."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from p2pfs.daemon.allocator import release_free_memory

KiB = 1 << 10


def _resident_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc on Linux",
)
def test_freed_blocks_in_the_middle_of_the_heap_are_given_back() -> None:
    """Blocks freed between live ones stay resident (nothing at the heap's top to cut);
    released, their pages go."""
    blocks = [bytes(4 * KiB) + bytes([i % 256]) for i in range(8192)]  # ~32 MiB, malloc'd
    keepers = blocks[::64]  # one live block in 64 pins the heap's extent
    del blocks
    freed = _resident_kib()
    assert release_free_memory()
    assert freed - _resident_kib() > 16 * KiB  # most of the ~31 MiB freed
    assert len(keepers) == 128
