"""How often a folder looks its members up in discovery: every CONNECT_INTERVAL while
lookups find providers not found before, then twice as long each time up to
LOOKUP_BACKOFF_MAX (a lookup that finds no other member crawls the DHT's 2k nearest)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.address import PeerAddress
from p2pfs.daemon.folders.manager import CONNECT_INTERVAL, LOOKUP_BACKOFF_MAX, LookupPace
from p2pfs.ids import NodeId

A = (NodeId(bytes(32)), PeerAddress("198.51.100.7", 7337))
B = (NodeId(bytes([1]) * 32), PeerAddress("203.0.113.9", 7337))


def test_the_pace_backs_off_while_nothing_new_is_found_and_starts_again_on_news() -> None:
    pace = LookupPace()
    assert pace.due < 0  # the first lookup at once
    now, waits = 0.0, []
    for _ in range(9):
        pace.looked_up(set(), now)
        waits.append(pace.due - now)
        now = pace.due
    assert waits == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0, 60.0, 60.0, 60.0]
    pace.looked_up({A}, now)  # a member announced itself
    assert pace.due - now == CONNECT_INTERVAL
    pace.looked_up({A}, now)  # the same member again: nothing new
    assert pace.due - now == 2 * CONNECT_INTERVAL
    pace.looked_up({B}, now)  # another
    assert pace.due - now == CONNECT_INTERVAL


@given(st.lists(st.sets(st.sampled_from([A, B])), max_size=30))
def test_the_wait_stays_between_the_interval_and_the_cap(
    rounds: list[set[tuple[NodeId | None, PeerAddress]]],
) -> None:
    pace = LookupPace()
    now = 0.0
    for found in rounds:
        pace.looked_up(found, now)
        assert CONNECT_INTERVAL <= pace.due - now <= LOOKUP_BACKOFF_MAX
        now = pace.due
