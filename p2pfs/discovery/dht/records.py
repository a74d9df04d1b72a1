"""Provider records (sans-I/O): who holds which DHT key, until when.

Many providers per key, each with its own expiry. Bounded, so a flood of announces costs the
node a fixed amount of memory, and shaped so that an attacker with a few addresses cannot
crowd honest providers out of a key:

- TTLs are capped at ``max_ttl`` (30 min, the re-announce period's default): a longer TTL buys
  nothing, so eviction and ordering never look at expiry;
- per key and IP: at most ``per_ip`` records (8), so one host with many ports cannot fill a key;
- per key and prefix (/24 for IPv4, /64 for IPv6): at most ``per_prefix`` (16), since a host
  owns its whole IPv6 /64 and often several IPv4 addresses of its /24;
- per key: at most ``per_key`` records (64). A new record over a bound evicts the oldest
  announce (not the shortest TTL) of its own IP or prefix, or, when the key is full, of the
  prefix holding the most records there: a newcomer from a prefix of its own only ever
  displaces the most represented prefix, which is an honest provider only if every prefix
  holds as few records as it does;
- per node: at most ``total`` records (100,000); when full, the least recently announced goes.

``get`` returns a key's records spread across prefixes: every prefix's freshest record first
(the least represented prefixes leading), then every prefix's second, and so on, so a prefix
with many records cannot push others past a reply's limit.

One record per (key, ip, port): a re-announce from the same address refreshes it. Time is a
parameter of every call; expired records are never returned and are dropped by ``expire``.
"""

from __future__ import annotations

import functools
import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from p2pfs.discovery.dht.ratelimit import source_prefix

DEFAULT_PER_KEY = 64
DEFAULT_PER_IP = 8
DEFAULT_PER_PREFIX = 16
DEFAULT_TOTAL = 100_000
DEFAULT_MAX_TTL = 1800.0
"""Equal to ``DhtFinder``'s default TTL: an honest provider re-announces within it."""


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    node_id: bytes
    ip: str
    port: int
    expires: float
    announced: float
    """When this record was last announced (created or refreshed)."""


Slot = tuple[bytes, str, int]
"""(key, ip, port): the identity of a record."""

_prefix: Callable[[str], str] = functools.lru_cache(maxsize=4096)(source_prefix)
"""Record IPs come from socket addresses, already canonical; parsed once each."""


def _oldest(records: Iterable[ProviderRecord]) -> ProviderRecord:
    return min(records, key=lambda r: (r.announced, r.ip, r.port))


class RecordStore:
    def __init__(
        self,
        *,
        per_key: int = DEFAULT_PER_KEY,
        per_ip: int = DEFAULT_PER_IP,
        per_prefix: int = DEFAULT_PER_PREFIX,
        total: int = DEFAULT_TOTAL,
        max_ttl: float = DEFAULT_MAX_TTL,
    ) -> None:
        self.per_key = per_key
        self.per_ip = per_ip
        self.per_prefix = per_prefix
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
        record = ProviderRecord(node_id, ip, port, now + min(ttl, self.max_ttl), now)
        records = self._by_key.setdefault(key, {})
        if (ip, port) not in records:
            victim = self._victim(list(records.values()), ip)
            if victim is not None:
                self._remove((key, victim.ip, victim.port))
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

    def _victim(self, records: list[ProviderRecord], ip: str) -> ProviderRecord | None:
        """The record a new one from ``ip`` displaces, if a bound is reached (see the module)."""
        same_ip = [r for r in records if r.ip == ip]
        if len(same_ip) >= self.per_ip:
            return _oldest(same_ip)
        prefix = _prefix(ip)
        same_prefix = [r for r in records if _prefix(r.ip) == prefix]
        if len(same_prefix) >= self.per_prefix:
            return _oldest(same_prefix)
        if len(records) < self.per_key:
            return None
        counts = Counter(_prefix(r.ip) for r in records)
        most = max(counts.values())
        return _oldest(r for r in records if counts[_prefix(r.ip)] == most)

    def next_expiry(self) -> float | None:
        """When ``expire`` next has work (perhaps earlier: stale entries are skipped then)."""
        return self._expiry[0][0] if self._expiry else None

    def remove(self, key: bytes, ip: str, port: int) -> None:
        if (ip, port) in self._by_key.get(key, {}):
            self._remove((key, ip, port))

    def get(self, key: bytes, now: float, limit: int) -> list[ProviderRecord]:
        """Live records of ``key``, at most ``limit``, spread across prefixes (see the module).

        The order never looks at expiry, so a longer TTL is never returned first.
        """
        live = [r for r in self._by_key.get(key, {}).values() if r.expires > now]
        by_prefix: dict[str, list[ProviderRecord]] = {}
        for record in live:
            by_prefix.setdefault(_prefix(record.ip), []).append(record)
        ranked: list[tuple[tuple[int, int, float, str, int], ProviderRecord]] = []
        for group in by_prefix.values():
            group.sort(key=lambda r: (-r.announced, r.ip, r.port))
            for rank, r in enumerate(group):
                ranked.append(((rank, len(group), -r.announced, r.ip, r.port), r))
        ranked.sort(key=lambda pair: pair[0])
        return [record for _, record in ranked[:limit]]

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
