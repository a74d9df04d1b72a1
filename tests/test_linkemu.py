"""The link emulator of ``python -m benchmarks links`` (benchmarks/linkemu.py): its model on a
virtual clock, and one real round trip through its forwarder."""

from __future__ import annotations

import random
import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.linkemu import MBIT, LinkConditions, LinkDirection, LinkForwarder


def fates(conditions: LinkConditions, seed: int, count: int, spacing: float) -> list[bool]:
    link = LinkDirection(conditions, random.Random(seed))
    return [link.offer(n * spacing, b"x" * 1200) for n in range(count)]


def drain(link: LinkDirection) -> list[tuple[float, bytes]]:
    """Every datagram still in flight, with the (virtual) time it arrives."""
    out = []
    while (at := link.next_due()) is not None:
        out += [(at, d) for d in link.due(at)]
    return out


def test_delay_holds_each_datagram_exactly_its_one_way_delay() -> None:
    link = LinkDirection(LinkConditions(delay=0.040), random.Random(1))
    link.offer(1.000, b"a")
    link.offer(1.005, b"b")
    assert link.due(1.0399) == []
    assert link.due(1.040) == [b"a"]
    assert link.next_due() == pytest.approx(1.045)
    assert link.due(2.0) == [b"b"]


def test_loss_rate_follows_the_seed_and_only_the_seed() -> None:
    lossy = LinkConditions(loss=0.01)
    first = fates(lossy, seed=7, count=50_000, spacing=1e-4)
    # Same seed, other arrival times: the n-th datagram meets the same fate.
    assert fates(lossy, seed=7, count=50_000, spacing=3e-3) == first
    assert fates(lossy, seed=8, count=50_000, spacing=1e-4) != first
    lost = first.count(False)
    assert 380 < lost < 620  # binomial(50,000, 1%): mean 500, sd 22


def test_bottleneck_paces_at_its_rate() -> None:
    rate = 10 * MBIT  # 1.25 MB/s
    conditions = LinkConditions(rate=rate, burst=1200, queue_bytes=10 << 20)
    link = LinkDirection(conditions, random.Random(0))
    link.watch(1_200_000, 2_400_000)
    for n in range(2_000):  # 2.4 MB offered at once
        assert link.offer(0.0, bytes([n % 256]) * 1200)
    arrivals = drain(link)
    assert len(arrivals) == 2_000
    assert arrivals[-1][0] == pytest.approx((2_000 - 1) * 1200 / rate, rel=1e-6)
    # Paced evenly: in any 0.1 s the link carries the rate's worth, give or take one datagram.
    in_window = [at for at, _ in arrivals if 0.5 <= at < 0.6]
    assert abs(len(in_window) * 1200 - 0.1 * rate) <= 1200
    assert [d[0] for _, d in arrivals] == [n % 256 for n in range(2_000)]  # FIFO
    # The marks: when the 1,000th and the 2,000th datagram were delivered.
    assert link.passed[1_200_000] == arrivals[999][0]
    assert link.passed[2_400_000] == arrivals[-1][0]


def test_a_full_queue_drops_the_tail() -> None:
    conditions = LinkConditions(rate=MBIT, burst=1200, queue_bytes=12_000)
    link = LinkDirection(conditions, random.Random(0))
    accepted = [link.offer(0.0, b"q" * 1200) for _ in range(50)]
    # The first leaves at once on the bucket's tokens; ten fit in the queue behind it.
    assert accepted == [True] * 11 + [False] * 39
    assert link.stats.queue_dropped == 39
    # Once the queue has drained, the link accepts again.
    assert link.offer(1.0, b"q" * 1200)


def test_reordering_lets_later_datagrams_overtake() -> None:
    conditions = LinkConditions(delay=0.01, reorder=0.1, reorder_delay=0.005)
    link = LinkDirection(conditions, random.Random(3))
    for n in range(1_000):
        link.offer(n * 1e-4, n.to_bytes(2, "big"))
    order = [int.from_bytes(d, "big") for _, d in drain(link)]
    assert sorted(order) == list(range(1_000))
    assert order != sorted(order)
    assert 60 < link.stats.reordered < 140


@given(
    seed=st.integers(0, 2**32),
    loss=st.floats(0, 0.5),
    duplicate=st.floats(0, 0.5),
    reorder=st.floats(0, 0.5),
    mbit=st.one_of(st.none(), st.floats(0.1, 1000)),
    sizes=st.lists(st.integers(1, 1500), max_size=200),
)
def test_every_datagram_is_accounted_for(
    seed: int, loss: float, duplicate: float, reorder: float, mbit: float | None, sizes: list[int]
) -> None:
    conditions = LinkConditions(
        delay=0.01,
        loss=loss,
        duplicate=duplicate,
        reorder=reorder,
        rate=None if mbit is None else mbit * MBIT,
        queue_bytes=20_000,
    )
    link = LinkDirection(conditions, random.Random(seed))
    for n, size in enumerate(sizes):
        link.offer(n * 1e-4, bytes(size))
    arrivals = drain(link)
    s = link.stats
    assert s.offered == len(sizes)
    assert len(arrivals) == s.delivered == s.offered - s.lost - s.queue_dropped + s.duplicated
    assert all(at >= 0.01 for at, _ in arrivals)


def test_forwarder_round_trip_carries_the_delay_both_ways() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo:
        echo.bind(("127.0.0.1", 0))
        echo.settimeout(5)
        conditions = LinkConditions.path(rtt=0.060, loss=0.0, mbit_per_s=100)
        with (
            LinkForwarder(echo.getsockname(), conditions, seed=1) as link,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
        ):
            client.settimeout(5)
            started = time.monotonic()
            client.sendto(b"ping", link.address)
            data, sender = echo.recvfrom(100)
            echo.sendto(data + b"-pong", sender)
            assert client.recvfrom(100)[0] == b"ping-pong"
            rtt = time.monotonic() - started
        assert 0.060 <= rtt < 0.5
        assert link.forward.stats.delivered == link.backward.stats.delivered == 1
