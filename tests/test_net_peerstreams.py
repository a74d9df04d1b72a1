"""PeerStreamIds: every peer stream opens once, whatever order its first data comes in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfs.errors import RemoteProtocolError
from p2pfs.net.peerstreams import STREAM_ID_STEP, PeerStreamIds


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[int, list[int]]:
    """A first id, and the order first data (and later, late data) arrives for the peer's
    streams: each stream's first arrival is a permutation of the ids; late data for a
    stream can come any time after its first."""
    first = draw(st.sampled_from([0, 1, 5]))
    count = draw(st.integers(1, 40))
    ids = [first + STREAM_ID_STEP * n for n in range(count)]
    order = draw(st.permutations(ids))
    events: list[int] = []
    for position, stream_id in enumerate(order):
        events.append(stream_id)
        seen = order[: position + 1]
        events += draw(st.lists(st.sampled_from(seen), max_size=3))
    return first, events


@given(arrivals())
def test_every_stream_opens_exactly_once_in_any_order(case: tuple[int, list[int]]) -> None:
    first, events = case
    ids = PeerStreamIds(first=first)
    opened: list[int] = []
    for stream_id in events:
        if ids.opens(stream_id):
            opened.append(stream_id)
    assert sorted(opened) == sorted(set(events))
    assert ids.skipped == 0


def test_a_stream_skipped_over_opens_when_its_data_comes_late() -> None:
    ids = PeerStreamIds(first=0)
    assert ids.opens(12)
    assert ids.skipped == 3  # 0, 4 and 8 are open in QUIC's eyes, not seen here yet
    assert ids.opens(4)
    assert not ids.opens(12)  # late data on a stream seen before
    assert not ids.opens(4)
    assert ids.opens(0)
    assert ids.opens(8)
    assert ids.skipped == 0


def test_a_peer_that_skips_too_many_ids_is_refused() -> None:
    ids = PeerStreamIds(first=1, limit=10)
    assert ids.opens(1 + STREAM_ID_STEP * 10)  # ten skipped: the limit
    with pytest.raises(RemoteProtocolError):
        ids.opens(1 + STREAM_ID_STEP * 12)


def test_an_id_of_another_kind_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        PeerStreamIds(first=0).opens(5)
