"""The stripe policy (swarm/stripes.py), exhaustively: pure, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfs.errors import LocalProtocolError
from p2pfs.swarm.stripes import MIN_BYTES_PER_STRIPE, STRIPE_MIN_RTT, stripes_for

rtts = st.none() | st.floats(min_value=0.0, max_value=5.0)
maxima = st.integers(min_value=1, max_value=16)
peer_counts = st.integers(min_value=1, max_value=200)
remaining = st.integers(min_value=0, max_value=1 << 40)


@given(rtts, st.booleans(), maxima, peer_counts, remaining)
def test_stripes_are_between_one_and_the_maximum(
    rtt: float | None, relayed: bool, most: int, peers: int, left: int
) -> None:
    plan = stripes_for(rtt, relayed=relayed, max_stripes=most, peers=peers, remaining_bytes=left)
    assert 1 <= plan.stripes <= most
    assert plan.reason


@given(rtts, st.booleans(), maxima, peer_counts, remaining)
def test_only_a_long_direct_path_gets_stripes(
    rtt: float | None, relayed: bool, most: int, peers: int, left: int
) -> None:
    plan = stripes_for(rtt, relayed=relayed, max_stripes=most, peers=peers, remaining_bytes=left)
    if plan.stripes > 1:
        assert not relayed
        assert rtt is not None and rtt >= STRIPE_MIN_RTT
        # Each stripe has enough left to carry to repay its handshake.
        assert left >= plan.stripes * MIN_BYTES_PER_STRIPE


@given(st.floats(min_value=STRIPE_MIN_RTT, max_value=5.0), maxima, peer_counts, remaining)
def test_the_fetch_aims_at_the_maximum_in_all_whatever_its_peers(
    rtt: float, most: int, peers: int, left: int
) -> None:
    plan = stripes_for(rtt, relayed=False, max_stripes=most, peers=peers, remaining_bytes=left)
    # Shared out: peers x stripes stays below the maximum plus one per peer.
    assert peers * plan.stripes < most + peers
    if left >= most * MIN_BYTES_PER_STRIPE:
        # ... and reaches it: every peer's share rounded up.
        assert peers * plan.stripes >= most


@given(
    st.floats(min_value=STRIPE_MIN_RTT, max_value=5.0), maxima, peer_counts, remaining, remaining
)
def test_more_left_never_means_fewer_stripes(
    rtt: float, most: int, peers: int, a: int, b: int
) -> None:
    low, high = sorted((a, b))
    fewer = stripes_for(rtt, relayed=False, max_stripes=most, peers=peers, remaining_bytes=low)
    more = stripes_for(rtt, relayed=False, max_stripes=most, peers=peers, remaining_bytes=high)
    assert fewer.stripes <= more.stripes


@given(st.floats(min_value=STRIPE_MIN_RTT, max_value=5.0), maxima, peer_counts, peer_counts)
def test_more_peers_never_means_more_stripes_each(rtt: float, most: int, a: int, b: int) -> None:
    few, many = sorted((a, b))
    left = 1 << 40
    one = stripes_for(rtt, relayed=False, max_stripes=most, peers=few, remaining_bytes=left)
    other = stripes_for(rtt, relayed=False, max_stripes=most, peers=many, remaining_bytes=left)
    assert other.stripes <= one.stripes


def test_the_cases_the_daemon_meets() -> None:
    big = 1 << 30
    assert (
        stripes_for(0.080, relayed=False, max_stripes=4, peers=1, remaining_bytes=big).stripes == 4
    )
    assert (
        stripes_for(0.080, relayed=False, max_stripes=4, peers=3, remaining_bytes=big).stripes == 2
    )
    assert (
        stripes_for(0.001, relayed=False, max_stripes=4, peers=1, remaining_bytes=big).stripes == 1
    )
    assert (
        stripes_for(0.080, relayed=True, max_stripes=4, peers=1, remaining_bytes=big).stripes == 1
    )
    assert (
        stripes_for(None, relayed=False, max_stripes=4, peers=1, remaining_bytes=big).stripes == 1
    )
    assert (
        stripes_for(0.080, relayed=False, max_stripes=1, peers=1, remaining_bytes=big).stripes == 1
    )
    small = 2 * MIN_BYTES_PER_STRIPE
    assert (
        stripes_for(0.080, relayed=False, max_stripes=4, peers=1, remaining_bytes=small).stripes
        == 2
    )


@pytest.mark.parametrize(("most", "peers", "left"), [(0, 1, 0), (4, 0, 0), (4, 1, -1)])
def test_nonsense_is_refused(most: int, peers: int, left: int) -> None:
    with pytest.raises(LocalProtocolError):
        stripes_for(0.05, relayed=False, max_stripes=most, peers=peers, remaining_bytes=left)
