"""A seeded userspace link emulator: delay, loss, duplication, reordering and a rate-limited
bottleneck with a drop-tail queue, between two UDP endpoints (the kernel here has no netem).

Two parts:

- :class:`LinkDirection` is the model of one direction of a link, sans-I/O: ``offer(now,
  datagram)`` and ``due(now)`` with time as a parameter, so a test drives it with a virtual
  clock. Every offered datagram consumes the same three draws of its seeded RNG whatever the
  clock says, so the n-th datagram's fate (lost, duplicated, held back) depends on the seed
  and n only; queue drops at the bottleneck depend on arrival times, as on a real link.
- :class:`LinkForwarder` is the I/O: one UDP socket on 127.0.0.1, a thread that forwards what
  the first non-target sender (the client) sends to ``target`` and back, each direction
  through its own :class:`LinkDirection`.

The order in one direction is: random loss (like netem's, before the queue), then the
bottleneck (a token bucket of ``rate`` bytes/s and ``burst`` bytes depth, FIFO; a datagram
that would push the bytes waiting in it beyond ``queue_bytes`` is dropped: drop-tail), then
the propagation delay, plus ``reorder_delay`` for the datagrams picked to arrive late
(those that follow overtake them). Used by ``python -m benchmarks links`` and by the lossy
path end-to-end test.
"""

from __future__ import annotations

import contextlib
import heapq
import random
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

MBIT = 1e6 / 8
"""Bytes per second in one Mbit/s."""


@dataclass(frozen=True, slots=True)
class LinkConditions:
    """One direction's conditions. ``rate`` None: no bottleneck (only loss and delay)."""

    delay: float = 0.0
    """One-way propagation delay, seconds."""
    loss: float = 0.0
    """Probability that a datagram is dropped (independent, before the queue)."""
    duplicate: float = 0.0
    """Probability that a delivered datagram is delivered twice."""
    reorder: float = 0.0
    """Probability that a datagram is held back by ``reorder_delay`` (later ones overtake)."""
    reorder_delay: float = 0.002
    rate: float | None = None
    """Bottleneck rate, bytes per second."""
    queue_bytes: int = 1 << 20
    """Drop-tail limit of the bottleneck's queue (bytes waiting, not yet serialised)."""
    burst: int = 16 * 1024
    """Token bucket depth: bytes that may leave back to back after an idle spell."""

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability")
        if self.delay < 0 or self.reorder_delay < 0:
            raise ValueError("delays must not be negative")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")

    @classmethod
    def path(cls, rtt: float, loss: float, mbit_per_s: float | None) -> LinkConditions:
        """One direction of a symmetric path: half the RTT each way, the same loss each way,
        and a drop-tail queue of one bandwidth-delay product (at least 64 KiB)."""
        rate = None if mbit_per_s is None else mbit_per_s * MBIT
        queue = max(64 * 1024, int((rate or 0) * rtt))
        return cls(delay=rtt / 2, loss=loss, rate=rate, queue_bytes=queue)


@dataclass(slots=True)
class DirectionStats:
    offered: int = 0
    lost: int = 0
    """Dropped by the random loss."""
    queue_dropped: int = 0
    """Dropped at the bottleneck because its queue was full."""
    duplicated: int = 0
    reordered: int = 0
    delivered: int = 0
    delivered_bytes: int = 0


class LinkDirection:
    """One direction of a link, sans-I/O: feed datagrams with ``offer``, collect the ones
    whose time has come with ``due``; ``next_due`` says when to look again."""

    def __init__(self, conditions: LinkConditions, rng: random.Random) -> None:
        self.conditions = conditions
        self.stats = DirectionStats()
        self._rng = rng
        self._tokens = float(conditions.burst)
        self._tokens_at = 0.0
        self._last_departure = float("-inf")
        self._queue: deque[tuple[float, int]] = deque()  # (departure, size) not yet gone
        self._queued_bytes = 0
        self._arrivals: list[tuple[float, int, bytes]] = []  # heap (time, seq, datagram)
        self._seq = 0
        self._marks: list[int] = []
        self.passed: dict[int, float] = {}
        """When the bytes delivered first reached each of the ``watch`` marks."""

    def watch(self, *marks: int) -> None:
        """Note when the bytes delivered reach each mark (a benchmark's rate on the wire,
        between two marks, leaves out connection set-up and the tail)."""
        self._marks = sorted(marks)

    def offer(self, now: float, datagram: bytes) -> bool:
        """A datagram enters the link at ``now``; False when it is dropped."""
        c = self.conditions
        self.stats.offered += 1
        # Always three draws, so the n-th datagram's fate does not depend on timing.
        lose, dup, late = self._rng.random(), self._rng.random(), self._rng.random()
        if lose < c.loss:
            self.stats.lost += 1
            return False
        departure = now if c.rate is None else self._bottleneck(now, len(datagram))
        if departure is None:
            self.stats.queue_dropped += 1
            return False
        arrival = departure + c.delay
        if late < c.reorder:
            self.stats.reordered += 1
            arrival += c.reorder_delay
        self._schedule(arrival, datagram)
        if dup < c.duplicate:
            self.stats.duplicated += 1
            self._schedule(arrival, datagram)
        return True

    def _bottleneck(self, now: float, size: int) -> float | None:
        """When a datagram of ``size`` bytes arriving at ``now`` has left the bottleneck
        (FIFO behind the ones queued, paced by the token bucket); None: queue full."""
        c = self.conditions
        assert c.rate is not None
        queue = self._queue
        while queue and queue[0][0] <= now:
            self._queued_bytes -= queue.popleft()[1]
        if self._queued_bytes + size > c.queue_bytes:
            return None
        start = max(now, self._last_departure)
        tokens = min(float(c.burst), self._tokens + (start - self._tokens_at) * c.rate)
        if tokens >= size:
            departure, tokens = start, tokens - size
        else:
            departure, tokens = start + (size - tokens) / c.rate, 0.0
        self._tokens, self._tokens_at, self._last_departure = tokens, departure, departure
        if departure > now:
            queue.append((departure, size))
            self._queued_bytes += size
        return departure

    def _schedule(self, at: float, datagram: bytes) -> None:
        heapq.heappush(self._arrivals, (at, self._seq, datagram))
        self._seq += 1

    def next_due(self) -> float | None:
        return self._arrivals[0][0] if self._arrivals else None

    def due(self, now: float) -> list[bytes]:
        """The datagrams that have arrived at the far end by ``now``, in arrival order."""
        out = []
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] <= now:
            datagram = heapq.heappop(arrivals)[2]
            out.append(datagram)
            self.stats.delivered += 1
            self.stats.delivered_bytes += len(datagram)
            while self._marks and self.stats.delivered_bytes >= self._marks[0]:
                self.passed[self._marks.pop(0)] = now
        return out


Address = tuple[str, int]


class LinkForwarder:
    """A UDP forwarder on 127.0.0.1 between one client and ``target``, each direction through
    its own :class:`LinkDirection` (``forward``: client to target; ``backward``: back).
    Give the client ``address`` instead of the target's. A context manager: the thread runs
    inside the ``with``."""

    def __init__(
        self,
        target: Address,
        forward: LinkConditions,
        backward: LinkConditions | None = None,
        seed: int = 0,
        socket_buffer: int = 8 << 20,
        seeds: tuple[int, int] | None = None,
    ) -> None:
        """``seeds``: the (forward, backward) RNG seeds, instead of ``2 seed, 2 seed + 1``; so
        two runs whose bulk data flows in opposite directions can meet the same losses."""
        self.target = target
        forward_seed, backward_seed = seeds or (seed * 2, seed * 2 + 1)
        self.forward = LinkDirection(forward, random.Random(forward_seed))
        self.backward = LinkDirection(backward or forward, random.Random(backward_seed))
        self.client: Address | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Large buffers, so the kernel's socket is not a hidden second bottleneck.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="linkemu", daemon=True)

    @property
    def address(self) -> Address:
        host, port = self.sock.getsockname()
        return str(host), int(port)

    def __enter__(self) -> LinkForwarder:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _run(self) -> None:
        sock, forward, backward = self.sock, self.forward, self.backward
        while not self._stop.is_set():
            now = time.monotonic()
            pending = [t for t in (forward.next_due(), backward.next_due()) if t is not None]
            # Wake at the next delivery, and at least every 0.1 s to notice the stop.
            # select(), not epoll: its timeout has microseconds, epoll's milliseconds.
            timeout = min([0.1, *(max(0.0, t - now) for t in pending)])
            readable, _, _ = select.select([sock], [], [], timeout)
            if readable:
                self._read_batch(time.monotonic())
            now = time.monotonic()
            if self.client is not None:
                for datagram in forward.due(now):
                    self._send(datagram, self.target)
                for datagram in backward.due(now):
                    self._send(datagram, self.client)

    def _read_batch(self, now: float) -> None:
        for _ in range(256):  # bounded, so deliveries are not starved by a flood
            try:
                datagram, sender = self.sock.recvfrom(65535)
            except (BlockingIOError, ConnectionRefusedError):
                return
            if sender == self.target:
                self.backward.offer(now, datagram)
            else:
                self.client = sender
                self.forward.offer(now, datagram)

    def _send(self, datagram: bytes, to: Address) -> None:
        # A full socket buffer or a gone peer is one more lost datagram, as on a link.
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            self.sock.sendto(datagram, to)
