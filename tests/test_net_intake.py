"""Properties of the receive-side backpressure accounting (net/intake.py), any event order."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.net.intake import Intake, IntakeLimits

LIMITS = IntakeLimits(stream=100, connection=250, hard=600, held=5, held_bytes=40)
STREAMS = range(4)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("receive"), st.sampled_from(STREAMS), st.integers(1, 120)),
        st.tuples(st.just("consume"), st.sampled_from(STREAMS), st.integers(1, 200)),
        st.tuples(st.just("block"), st.sampled_from(STREAMS), st.just(0)),
        st.tuples(st.just("unblock"), st.sampled_from(STREAMS), st.just(0)),
        st.tuples(st.just("abandon"), st.sampled_from(STREAMS), st.just(0)),
        # n datagrams of 3n to 3n + 6 bytes (a held item is its own size).
        st.tuples(st.just("arrive"), st.just(0), st.integers(1, 4)),
    ),
    max_size=60,
)


@dataclass
class Model:
    """The connection around the intake: per-stream unread bytes and datagram bookkeeping."""

    intake: Intake[int, int] = field(default_factory=lambda: Intake(LIMITS, measure=int))
    buffered: dict[int, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    offered: int = 0
    fed: int = 0

    def resume(self) -> None:
        self.fed += len(self.intake.resume())

    def consume(self, stream: int, size: int) -> None:
        size = min(size, self.buffered[stream])
        if not size:
            return
        self.buffered[stream] -= size
        if self.intake.consumed(stream, size, self.buffered[stream]):
            self.resume()


def reading_everything_resumes(model: Model) -> bool:
    trial = copy.deepcopy(model)
    for stream in STREAMS:
        trial.consume(stream, trial.buffered[stream])
    return not trial.intake.paused


@settings(max_examples=400, deadline=None)
@given(ops)
def test_intake_accounting_and_liveness(steps: list[tuple[str, int, int]]) -> None:
    m = Model()
    intake = m.intake
    for op, stream, n in steps:
        if op == "receive":
            m.buffered[stream] += n
            blocked_before = bool(intake.blocked_writers)
            was_paused = intake.paused
            intake.received(stream, n, m.buffered[stream])
            if intake.over_hard_limit:
                assert intake.paused  # the hard bound holds whatever the writers
            elif blocked_before and not was_paused:
                assert not intake.paused  # a blocked writer keeps its ACKs flowing
        elif op == "consume":
            m.consume(stream, n)
        elif op == "block":
            expect = intake.paused and not intake.over_hard_limit
            resume = intake.writer_blocked(stream)
            assert resume == expect
            if resume:
                m.resume()
        elif op == "unblock":
            intake.retain_blocked(lambda s, gone=stream: s != gone)
        elif op == "abandon":
            m.consume(stream, m.buffered[stream])  # a reset drops what was unread
            intake.forget(stream)
        elif op == "arrive":
            if intake.resume_for_writer():
                m.resume()
            m.offered += n
            if intake.paused:
                intake.hold(range(3 * n, 3 * n + 2 * n, 2))
            else:
                m.fed += n
        # Accounting: every unread byte is counted once.
        assert intake.unread == sum(m.buffered.values())
        # Held datagrams are bounded, and each one is fed, held or counted as dropped.
        assert len(intake.held) <= LIMITS.held
        assert intake.held_bytes == sum(intake.held) <= LIMITS.held_bytes
        assert m.fed + len(intake.held) + intake.held_dropped == m.offered
        if not intake.paused:
            assert not intake.held
        # Liveness: a paused connection always has something to read, and reading it all
        # resumes intake (the reader can never be left waiting on a paused connection).
        if intake.paused:
            assert intake.unread > 0
            assert reading_everything_resumes(m)


def test_put_back_keeps_order() -> None:
    intake: Intake[int, int] = Intake(LIMITS)
    intake.received(0, 300, 300)
    assert intake.paused
    intake.hold([1, 2, 3, 4])
    held = intake.resume()
    held.popleft()  # one was fed, then intake paused again
    intake.received(0, 1, 301)
    intake.put_back(held)
    intake.hold([5])
    assert list(intake.held) == [2, 3, 4, 5]


def test_held_datagrams_are_bounded_by_their_bytes_too() -> None:
    """Datagrams of up to 64 KiB: the count alone would let a paused connection park 256
    MiB; the byte bound drops what is beyond it (QUIC resends what mattered)."""
    limits = IntakeLimits(stream=100, connection=250, hard=600, held=100, held_bytes=150_000)
    intake: Intake[int, bytes] = Intake(limits, measure=len)
    intake.received(0, 300, 300)
    assert intake.paused
    intake.hold([bytes(60_000), bytes(60_000), bytes(60_000), bytes(1_000)])
    assert [len(d) for d in intake.held] == [60_000, 60_000, 1_000]
    assert intake.held_bytes == 121_000
    assert intake.held_dropped == 1
    held = intake.resume()
    assert intake.held_bytes == 0
    held.popleft()
    intake.received(0, 1, 301)
    intake.put_back(held)
    assert intake.held_bytes == 61_000
