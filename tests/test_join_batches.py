"""How a reconcile splits a member's differing records into batches."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.daemon.folders.engine import FIRST_BATCH_SHARE, JOIN_BATCH, join_batch_sizes

FIRST = JOIN_BATCH // FIRST_BATCH_SHARE


@given(
    total=st.integers(min_value=0, max_value=200_000),
    batch=st.integers(min_value=1, max_value=10_000),
    first=st.integers(min_value=1, max_value=10_000),
)
def test_batches_take_every_record_once_and_none_is_too_big(
    total: int, batch: int, first: int
) -> None:
    sizes = join_batch_sizes(total, batch, first)
    assert sum(sizes) == total
    assert all(0 < size <= batch for size in sizes) or sizes == [0]
    if len(sizes) > 1:
        assert sizes[0] == min(first, batch)
        assert all(size == batch for size in sizes[1:-1])  # only the last is short


def test_a_join_starts_with_a_small_batch_a_small_reconcile_is_one() -> None:
    assert join_batch_sizes(0, JOIN_BATCH, FIRST) == [0]
    assert join_batch_sizes(300, JOIN_BATCH, FIRST) == [300]
    assert join_batch_sizes(JOIN_BATCH, JOIN_BATCH, FIRST) == [JOIN_BATCH]
    sizes = join_batch_sizes(50_000, JOIN_BATCH, FIRST)
    assert sizes[:2] == [FIRST, JOIN_BATCH]
    assert len(sizes) == 1 + -(-(50_000 - FIRST) // JOIN_BATCH)
