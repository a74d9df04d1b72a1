"""Provider records (sans-I/O): who holds which DHT key, until when.

Many providers per key, each with its own expiry. Bounded three ways, so a flood of announces
costs the node a fixed amount of memory:

- per key: at most ``per_key`` records (64); when full, the record expiring soonest goes;
- per key and IP: at most ``per_ip`` records (8), so one host with many ports cannot fill a key;
- per node: at most ``total`` records (100,000); when full, the least recently announced goes.

One record per (key, ip, port): a re-announce from the same address refreshes it. Time is a
parameter of every call; expired records are never returned and are dropped by ``expire``.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_PER_KEY = 64
DEFAULT_PER_IP = 8
DEFAULT_TOTAL = 100_000
DEFAULT_MAX_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    node_id: bytes
    ip: str
    port: int
    expires: float


Slot = tuple[bytes, str, int]
"""(key, ip, port): the identity of a record."""


class RecordStore:
    def __init__(
        self,
        *,
        per_key: int = DEFAULT_PER_KEY,
        per_ip: int = DEFAULT_PER_IP,
        total: int = DEFAULT_TOTAL,
        max_ttl: float = DEFAULT_MAX_TTL,
    ) -> None:
        self.per_key = per_key
        self.per_ip = per_ip
        self.total = total
        self.max_ttl = max_ttl
        self._by_key: dict[bytes, dict[tuple[str, int], ProviderRecord]] = {}
        self._recency: OrderedDict[Slot, None] = OrderedDict()
        self._expiry: list[tuple[float, Slot]] = []
        """A heap with stale entries (refreshed records); checked against the live record."""

    def __len__(self) -> int:
        return len(self._recency)

    def keys(self) -> list[bytes]:
        return list(self._by_key)

    def add(self, key: bytes, node_id: bytes, ip: str, port: int, ttl: float, now: float) -> None:
        self.expire(now)
        record = ProviderRecord(node_id, ip, port, now + min(ttl, self.max_ttl))
        records = self._by_key.setdefault(key, {})
        if (ip, port) not in records:
            same_ip = [slot for slot in records if slot[0] == ip]
            if len(same_ip) >= self.per_ip:
                self._remove((key, *min(same_ip, key=lambda slot: records[slot].expires)))
            elif len(records) >= self.per_key:
                self._remove((key, *min(records, key=lambda slot: records[slot].expires)))
            records = self._by_key.setdefault(key, {})
        records[(ip, port)] = record
        slot = (key, ip, port)
        self._recency[slot] = None
        self._recency.move_to_end(slot)
        heapq.heappush(self._expiry, (record.expires, slot))
        while len(self._recency) > self.total:
            self._remove(next(iter(self._recency)))
        if len(self._expiry) > 2 * len(self._recency) + 64:
            self._expiry = [(self._by_key[s[0]][(s[1], s[2])].expires, s) for s in self._recency]
            heapq.heapify(self._expiry)

    def next_expiry(self) -> float | None:
        """When ``expire`` next has work (perhaps earlier: stale entries are skipped then)."""
        return self._expiry[0][0] if self._expiry else None

    def remove(self, key: bytes, ip: str, port: int) -> None:
        if (ip, port) in self._by_key.get(key, {}):
            self._remove((key, ip, port))

    def get(self, key: bytes, now: float, limit: int) -> list[ProviderRecord]:
        """Live records of ``key``, the longest-lived first, at most ``limit``."""
        live = [r for r in self._by_key.get(key, {}).values() if r.expires > now]
        live.sort(key=lambda record: record.expires, reverse=True)
        return live[:limit]

    def expire(self, now: float) -> int:
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            expires, slot = heapq.heappop(self._expiry)
            record = self._by_key.get(slot[0], {}).get((slot[1], slot[2]))
            if record is not None and record.expires == expires:
                self._remove(slot)
                dropped += 1
        return dropped

    def _remove(self, slot: Slot) -> None:
        key, ip, port = slot
        records = self._by_key[key]
        del records[(ip, port)]
        if not records:
            del self._by_key[key]
        del self._recency[slot]
