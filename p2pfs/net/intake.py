"""Receive-side backpressure for one connection, sans-I/O: when to stop feeding the engine.

The engines grant flow-control credit as soon as data is delivered to the adapter, not when
the application reads it, so the adapter bounds what it holds itself: while too much is
unread, it stops handing the connection's datagrams to the engine (they wait in a bounded
queue, beyond which they are dropped for QUIC's loss recovery to resend), which stops ACKs
and credit and so slows the sender.

Rules (limits from TransportConfig):
- Pause when a stream holds more than ``stream`` unread bytes, or the connection more than
  ``connection``, unless a writer on this connection is blocked: a blocked writer needs the
  ACKs in those datagrams, and a task that must finish a write before it reads again (an
  echo) would otherwise deadlock.
- Pause regardless above ``hard`` unread bytes.
- Resume when every stream is back to half its bound and the connection to half of its, or
  when a writer blocks (while under ``hard``).

Invariant (tests/test_net_intake.py): while paused, the reader has unread bytes whose
consumption resumes intake, so a paused connection can always be woken by reading.

``S`` is the stream type (only hashed), ``D`` what is held (a datagram and its address).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

S = TypeVar("S")
D = TypeVar("D")


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    stream: int
    connection: int
    hard: int
    held: int
    """Datagrams parked while paused, at most; and their bytes, at most (a datagram may be
    anything up to 64 KiB: a count alone would let 4,096 of them hold 256 MiB)."""
    held_bytes: int = 1 << 62


class Intake(Generic[S, D]):
    """Unread-byte accounting, blocked writers and held datagrams of one connection."""

    def __init__(self, limits: IntakeLimits, measure: Callable[[D], int] = lambda _item: 0) -> None:
        self.limits = limits
        self.unread = 0
        self.paused = False
        self.held: deque[D] = deque()
        self.held_bytes = 0
        self.held_dropped = 0
        self._measure = measure
        self._full: set[S] = set()
        self._blocked: set[S] = set()

    @property
    def blocked_writers(self) -> frozenset[S]:
        return frozenset(self._blocked)

    @property
    def over_hard_limit(self) -> bool:
        return self.unread > self.limits.hard

    # -- events ---------------------------------------------------------------------------

    def received(self, stream: S, kept: int, buffered: int) -> None:
        """``stream`` kept ``kept`` new bytes and now holds ``buffered`` unread."""
        if not kept:
            return
        self.unread += kept
        if buffered > self.limits.stream:
            self._full.add(stream)
        if not self.paused and self._should_pause():
            self.paused = True

    def consumed(self, stream: S, size: int, buffered: int) -> bool:
        """``size`` bytes of ``stream`` were read or dropped; it holds ``buffered`` now.
        True if intake should resume now."""
        self.unread -= size
        if stream in self._full and buffered <= self.limits.stream // 2:
            self._full.discard(stream)
        return self.paused and not self._full and self.unread <= self.limits.connection // 2

    def writer_blocked(self, stream: S) -> bool:
        """``stream``'s writer waits for room; True if intake should resume now (the
        writer's ACKs are in the held datagrams)."""
        self._blocked.add(stream)
        return self.paused and not self.over_hard_limit

    def retain_blocked(self, still_blocked: Callable[[S], bool]) -> None:
        """Keep only the writers for which ``still_blocked`` is true (it may wake them)."""
        self._blocked = {s for s in self._blocked if still_blocked(s)}

    def writer_gone(self, stream: S) -> None:
        """``stream`` will never write again (the peer stopped reading it)."""
        self._blocked.discard(stream)

    def forget(self, stream: S) -> None:
        """``stream`` was abandoned: it is neither full nor blocked any more."""
        self._blocked.discard(stream)
        self._full.discard(stream)

    def resume_for_writer(self) -> bool:
        """On datagram arrival: True if a blocked writer justifies feeding the held ones."""
        return self.paused and bool(self._blocked) and not self.over_hard_limit

    # -- held datagrams -------------------------------------------------------------------

    def hold(self, items: Iterable[D]) -> None:
        """Park ``items`` while paused; beyond the bound they are dropped (and counted)."""
        for item in items:
            size = self._measure(item)
            if (
                len(self.held) < self.limits.held
                and self.held_bytes + size <= self.limits.held_bytes
            ):
                self.held.append(item)
                self.held_bytes += size
            else:
                self.held_dropped += 1

    def resume(self) -> deque[D]:
        """Unpause and hand over what was held, oldest first."""
        self.paused = False
        held, self.held = self.held, deque()
        self.held_bytes = 0
        return held

    def put_back(self, items: deque[D]) -> None:
        """Return what could not be fed (intake paused again) to the front of the queue."""
        self.held.extendleft(reversed(items))
        self.held_bytes += sum(map(self._measure, items))

    def lost(self) -> None:
        """The connection ended: nothing is held or blocked any more."""
        self._blocked.clear()
        self.held.clear()
        self.held_bytes = 0

    # -- internals ------------------------------------------------------------------------

    def _should_pause(self) -> bool:
        if self.over_hard_limit:
            return True
        over = bool(self._full) or self.unread > self.limits.connection
        return over and not self._blocked
