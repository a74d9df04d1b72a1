"""An in-process event bus: what happened in the daemon, for the HTTP API's event stream.

Emitting never blocks and never fails: the point where something happens (a file placed,
a scan finished, a fetch ended) calls ``emit`` and goes on. Each event gets the next id and
lands in a ring of the most recent ones (``/api/events?since=ID`` reads it, and a client
that reconnects with ``Last-Event-ID`` is replayed from it). A subscriber that falls more
than ``SUBSCRIBER_BUFFER`` events behind is cut off rather than slowing the daemon or
growing its memory; it reconnects and replays what the ring still holds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import trio

logger = logging.getLogger(__name__)

RECENT_EVENTS = 1000
SUBSCRIBER_BUFFER = 256


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    time: float
    """Wall-clock seconds (for people reading the stream; ordering is by ``id``)."""
    type: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "type": self.type, "data": self.data}


class EventBus:
    def __init__(self, recent: int = RECENT_EVENTS) -> None:
        self._recent: deque[Event] = deque(maxlen=recent)
        self._next_id = 1
        self._subscribers: set[trio.MemorySendChannel[Event]] = set()
        self.emitted = 0

    def emit(self, kind: str, **data: Any) -> Event:
        """Record one event and hand it to every subscriber (from the trio thread)."""
        event = Event(self._next_id, time.time(), kind, data)
        self._next_id += 1
        self.emitted += 1
        self._recent.append(event)
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                # Too slow a reader: it is dropped (its stream ends) and replays on
                # reconnect; the daemon neither waits for it nor buffers without bound.
                logger.info("event subscriber fell %d events behind; dropped", SUBSCRIBER_BUFFER)
                self._drop(channel)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._drop(channel)
        return event

    def recent(self, after: int = 0, limit: int = RECENT_EVENTS) -> list[Event]:
        """Events with an id above ``after``, oldest first (at most ``limit``, the newest)."""
        found = [event for event in self._recent if event.id > after]
        return found[-limit:] if limit else []

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[Event]]:
        """Events emitted from now on, until the block ends or the reader falls behind
        (then the channel ends: ``async for`` stops)."""
        send, receive = trio.open_memory_channel[Event](SUBSCRIBER_BUFFER)
        self._subscribers.add(send)
        try:
            with receive:
                yield receive
        finally:
            self._drop(send)

    def _drop(self, channel: trio.MemorySendChannel[Event]) -> None:
        self._subscribers.discard(channel)
        channel.close()


RATE_WINDOW = 1.0
"""Seconds a rate averages over at least (readers ask every second or so)."""


class RateMeter:
    """Bytes per second of growing counters (per peer, per transfer), computed when asked
    from the counter's value then and at an earlier look at least RATE_WINDOW before: the
    daemon keeps no timer for it."""

    def __init__(self) -> None:
        self._looks: dict[object, tuple[float, int, float]] = {}

    def rate(self, key: object, value: int, now: float) -> float:
        look = self._looks.get(key)
        if look is None:
            self._looks[key] = (now, value, 0.0)
            return 0.0
        then, before, rate = look
        if now - then >= RATE_WINDOW:
            rate = max(0, value - before) / (now - then)
            self._looks[key] = (now, value, rate)
        return rate

    def keep_only(self, keys: set[object]) -> None:
        """Forget counters that are gone (closed connections, finished transfers)."""
        for key in [k for k in self._looks if k not in keys]:
            del self._looks[key]
