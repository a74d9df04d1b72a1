"""How many bytes to keep requested from one peer: its bandwidth-delay product, measured.

A fast, distant peer needs many requests in flight to stay busy; a slow one should hold few,
so that it does not sit on pieces that the tail of a fetch waits for. The controller keeps,
per peer:

- the **delivery rate**: bytes received divided by *busy* time (time with something in
  flight; idle gaps do not count) over a sliding window of the last ``max(4 x smoothed RTT,
  rate_window)`` busy seconds;
- the **minimum RTT** over the last ``rtt_window`` seconds (the path's delay without our own
  queue; the smoothed RTT includes the queue that deep pipelining builds at the peer, and
  using it would let the target feed on itself);

and targets ``gain x rate x min_rtt``, clamped to ``[min_bytes, max_bytes]``. With gain 2 the
target doubles every round trip while the peer keeps up (as TCP's slow start and BBR's
startup do) and settles at twice the bandwidth-delay product once the peer's bandwidth is the
limit. Before the first response the target is ``initial_bytes``.

``stalled(now, deadline)``: bytes are in flight and nothing has arrived for ``deadline``
seconds (measured from the last response, or from the request that ended an idle period).
``stall_time(deadline)`` gives the instant that becomes true, so the caller arms one timer
instead of polling. Times are seconds from any monotonic clock; the caller passes them in.
"""

from __future__ import annotations

from collections import deque

from p2pfs.errors import LocalProtocolError

__all__ = ["PipelineController"]


class PipelineController:
    """Per-peer request depth from measured throughput and RTT (see the module docstring)."""

    def __init__(
        self,
        *,
        initial_bytes: int = 1 << 20,
        min_bytes: int = 256 << 10,
        max_bytes: int = 64 << 20,
        gain: float = 2.0,
        rate_window: float = 1.0,
        rtt_window: float = 10.0,
    ) -> None:
        if not 0 < min_bytes <= max_bytes:
            raise LocalProtocolError(f"need 0 < min_bytes <= max_bytes: {min_bytes}, {max_bytes}")
        if gain <= 0 or rate_window <= 0 or rtt_window <= 0:
            raise LocalProtocolError("gain, rate_window and rtt_window must be positive")
        self._min = min_bytes
        self._max = max_bytes
        self._initial = min(max(initial_bytes, min_bytes), max_bytes)
        self._gain = gain
        self._rate_window = rate_window
        self._rtt_window = rtt_window
        self._in_flight = 0
        self._delivered = 0
        self._busy_accum = 0.0
        """Busy seconds in finished busy periods."""
        self._busy_since = 0.0
        self._samples: deque[tuple[float, int]] = deque([(0.0, 0)])
        """(busy time, bytes delivered so far), oldest first."""
        self._rate: float | None = None
        self._rtts: deque[tuple[float, float]] = deque()
        """Sliding-window minimum: (time, rtt) with rtt increasing front to back."""
        self._srtt: float | None = None
        self._last_progress = 0.0

    # -- inputs ------------------------------------------------------------------------------

    def on_request(self, size: int, now: float) -> None:
        """``size`` bytes were requested from the peer."""
        if size < 0:
            raise LocalProtocolError(f"negative request size {size}")
        if self._in_flight == 0:
            self._busy_since = now
            self._last_progress = now
        self._in_flight += size

    def on_response(self, size: int, rtt: float, now: float) -> None:
        """``size`` bytes arrived, ``rtt`` seconds after they were requested."""
        if size < 0 or rtt < 0:
            raise LocalProtocolError(f"negative response size or rtt: {size}, {rtt}")
        busy = self._busy_now(now)
        self._delivered += size
        self._samples.append((busy, self._delivered))
        self._last_progress = now
        self._srtt = rtt if self._srtt is None else 0.875 * self._srtt + 0.125 * rtt
        while self._rtts and self._rtts[-1][1] >= rtt:
            self._rtts.pop()
        self._rtts.append((now, rtt))
        while self._rtts[0][0] < now - self._rtt_window:
            self._rtts.popleft()
        window = max(4 * self._srtt, self._rate_window)
        while len(self._samples) > 2 and self._samples[1][0] <= busy - window:
            self._samples.popleft()
        base_busy, base_delivered = self._samples[0]
        if busy > base_busy:
            self._rate = (self._delivered - base_delivered) / (busy - base_busy)
        self._settle(size, now)

    def on_cancel(self, size: int, now: float) -> None:
        """``size`` requested bytes will not come (cancelled, failed, peer gone)."""
        if size < 0:
            raise LocalProtocolError(f"negative cancel size {size}")
        self._settle(size, now)

    # -- outputs -----------------------------------------------------------------------------

    def target_bytes(self) -> int:
        """How many bytes to keep in flight to this peer."""
        if self._rate is None or not self._rtts:
            return self._initial
        bdp = self._gain * self._rate * self._rtts[0][1]
        return int(min(max(bdp, self._min), self._max))

    def room(self) -> int:
        """Bytes that may be requested now: ``target_bytes() - in_flight``, at least 0."""
        return max(0, self.target_bytes() - self._in_flight)

    def stalled(self, now: float, deadline: float) -> bool:
        """Bytes are in flight and nothing arrived for ``deadline`` seconds."""
        return self._in_flight > 0 and now - self._last_progress >= deadline

    def stall_time(self, deadline: float) -> float | None:
        """When ``stalled(t, deadline)`` becomes true if nothing arrives; None when idle."""
        return self._last_progress + deadline if self._in_flight > 0 else None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def throughput(self) -> float | None:
        """Measured delivery rate in bytes per busy second; None before any response."""
        return self._rate

    @property
    def min_rtt(self) -> float | None:
        return self._rtts[0][1] if self._rtts else None

    # -- internals ---------------------------------------------------------------------------

    def _busy_now(self, now: float) -> float:
        if self._in_flight == 0:
            return self._busy_accum
        return self._busy_accum + max(0.0, now - self._busy_since)

    def _settle(self, size: int, now: float) -> None:
        if self._in_flight == 0:
            return
        busy = self._busy_now(now)
        self._in_flight = max(0, self._in_flight - size)
        if self._in_flight == 0:
            self._busy_accum = busy
