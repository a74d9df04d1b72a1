"""The splitting of a stream's queued parts into one engine write's worth (net/stream.py)."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.net.stream import _take


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=12), st.lists(st.integers(1, 60)))
def test_taking_in_any_sizes_yields_the_bytes_in_order(
    parts: list[bytes], sizes: list[int]
) -> None:
    views = deque(memoryview(p) for p in parts)
    out = []
    for size in [*sizes, 10**6]:
        available = sum(len(v) for v in views)
        taken = _take(views, size)
        # As much as asked for, or all there is; never an empty piece.
        assert sum(len(v) for v in taken) == min(size, available)
        assert all(len(v) for v in taken)
        out.extend(bytes(v) for v in taken)
    assert b"".join(out) == b"".join(parts)
    assert not views
