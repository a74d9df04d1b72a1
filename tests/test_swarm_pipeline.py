"""PipelineController: the target follows the bandwidth-delay product; stalls are detected."""

from __future__ import annotations

import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.errors import LocalProtocolError
from p2pfs.swarm import PipelineController

CHUNK = 64 << 10


def drive(
    controller: PipelineController,
    phases: list[tuple[float, float]],
    *,
    one_way: float = 0.025,
    start: float = 0.0,
) -> float:
    """Keep ``controller``'s target requested from a peer that serves FIFO at each phase's
    bandwidth (bytes/s) for that phase's duration (s); returns the end time."""
    now = start
    server_free = start
    arrivals: list[tuple[float, float]] = []  # (arrival time, request time)
    for bandwidth, duration in phases:
        end = now + duration
        while now < end:
            while controller.room() >= CHUNK:
                controller.on_request(CHUNK, now)
                served = max(now + one_way, server_free) + CHUNK / bandwidth
                server_free = served
                heapq.heappush(arrivals, (served + one_way, now))
            arrived, sent = heapq.heappop(arrivals)
            now = arrived
            controller.on_response(CHUNK, arrived - sent, now)
    for arrived, sent in sorted(arrivals):  # what is still in flight arrives
        now = arrived
        controller.on_response(CHUNK, arrived - sent, now)
    return now


def test_target_grows_with_throughput() -> None:
    fast, slow = PipelineController(), PipelineController()
    drive(fast, [(100e6, 3.0)])
    drive(slow, [(1e6, 3.0)])
    assert fast.throughput is not None and slow.throughput is not None
    assert fast.throughput == pytest.approx(100e6, rel=0.15)
    assert slow.throughput == pytest.approx(1e6, rel=0.15)
    # fast: 2 x 100 MB/s x ~50 ms = ~10 MB; slow: clamped to the 256 KiB floor
    assert 6e6 < fast.target_bytes() < 16e6
    assert slow.target_bytes() == 256 << 10
    assert fast.target_bytes() > 20 * slow.target_bytes()


def test_target_shrinks_when_a_peer_slows_down() -> None:
    controller = PipelineController()
    now = drive(controller, [(50e6, 2.0)])
    before = controller.target_bytes()
    drive(controller, [(2e6, 3.0)], start=now)
    assert controller.target_bytes() < before / 5


def test_target_clamped_and_initial() -> None:
    controller = PipelineController(initial_bytes=1 << 30, max_bytes=8 << 20)
    assert controller.target_bytes() == 8 << 20
    drive(controller, [(1e9, 1.0)], one_way=0.1)
    assert controller.target_bytes() == 8 << 20
    with pytest.raises(LocalProtocolError):
        PipelineController(min_bytes=10, max_bytes=5)


def test_idle_time_does_not_count_against_throughput() -> None:
    controller = PipelineController()
    now = drive(controller, [(10e6, 1.0)])
    while controller.in_flight:  # drain, then sit idle for a minute
        controller.on_response(CHUNK, 0.05, now)
    rate = controller.throughput
    assert rate is not None
    controller.on_request(CHUNK, now + 60)
    controller.on_response(CHUNK, 0.06, now + 60.06)
    assert controller.throughput is not None
    assert controller.throughput > rate / 2


def test_stalled() -> None:
    controller = PipelineController()
    assert not controller.stalled(100.0, 2.0)  # nothing in flight
    assert controller.stall_time(2.0) is None
    controller.on_request(CHUNK, 10.0)
    controller.on_request(CHUNK, 10.5)  # more requests are not progress
    assert controller.stall_time(2.0) == 12.0
    assert not controller.stalled(11.9, 2.0)
    assert controller.stalled(12.0, 2.0)
    controller.on_response(CHUNK, 1.5, 11.5)
    assert not controller.stalled(13.0, 2.0)
    assert controller.stalled(13.5, 2.0)
    controller.on_cancel(CHUNK, 14.0)
    assert controller.in_flight == 0
    assert not controller.stalled(100.0, 2.0)


op = st.one_of(
    st.tuples(st.just("request"), st.integers(0, 4 << 20), st.floats(0, 1)),
    st.tuples(st.just("response"), st.integers(0, 4 << 20), st.floats(0, 1)),
    st.tuples(st.just("cancel"), st.integers(0, 4 << 20), st.floats(0, 1)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(op, max_size=60), initial=st.integers(0, 1 << 28))
def test_target_always_within_bounds(ops: list[tuple[str, int, float]], initial: int) -> None:
    controller = PipelineController(initial_bytes=initial)
    now = 0.0
    expected = 0
    for kind, size, step in ops:
        now += step
        if kind == "request":
            controller.on_request(size, now)
            expected += size
        elif kind == "response":
            controller.on_response(size, step, now)
            expected = max(0, expected - size)
        else:
            controller.on_cancel(size, now)
            expected = max(0, expected - size)
        assert controller.in_flight == expected
        assert 256 << 10 <= controller.target_bytes() <= 64 << 20
        assert controller.room() == max(0, controller.target_bytes() - expected)
        rate = controller.throughput
        assert rate is None or rate >= 0
