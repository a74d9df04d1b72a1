"""Per-source request limits (sans-I/O): token buckets per IP, per network prefix, and in total.

A DHT node answers anyone, and a UDP source address can be forged, so without a limit one host
could make us spend all our CPU and upstream on it, or aim our replies at a third party. Every
request datagram is admitted or dropped here before any of it is decoded:

- per source IP: ``per_ip`` (a host, or one NAT);
- per prefix, a /24 for IPv4 and a /64 for IPv6: ``per_prefix`` (what one subscriber or one
  rented server usually holds; an IPv6 host picks freely inside its /64, so the IP bucket alone
  would not hold it);
- in total: ``total``, so many sources together cannot either.

A request is admitted only when all three buckets hold a token, and only then does it take one
from each: a flood from one source empties its own buckets, never its neighbours' or the
global one. The tables are bounded (least recently seen source evicted first); an evicted
source comes back with a full bucket, which is why the global bucket exists. Time is a
parameter of every call.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

IPV4_PREFIX = 24
IPV6_PREFIX = 64


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's shape: ``per_second`` sustained, up to ``burst`` at once."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if self.per_second < 0 or self.burst < 1:
            raise ValueError("a rate needs per_second >= 0 and burst >= 1")


@dataclass(frozen=True, slots=True)
class RequestLimits:
    # An honest lookup sends one or two requests to each node it asks, so an honest host rarely
    # sends one node more than a few a second; these leave room for several nodes behind one
    # address (a NAT, a test bed on loopback) and cost a node at most ``total`` replies a second.
    per_ip: Rate = field(default_factory=lambda: Rate(50.0, 200.0))
    per_prefix: Rate = field(default_factory=lambda: Rate(200.0, 800.0))
    total: Rate = field(default_factory=lambda: Rate(1000.0, 2000.0))
    table_size: int = 4096
    """Sources (and, separately, prefixes) tracked at once."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float

    def refill(self, rate: Rate, now: float) -> None:
        # A clock that steps back (never with a monotonic clock) must not mint tokens.
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(rate.burst, self.tokens + elapsed * rate.per_second)
        self.updated = max(self.updated, now)


class _BucketTable:
    """Buckets by name, the least recently used evicted beyond ``size``."""

    def __init__(self, rate: Rate, size: int) -> None:
        self.rate = rate
        self.size = size
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, name: str, now: float) -> _Bucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = _Bucket(self.rate.burst, now)
            self._buckets[name] = bucket
            if len(self._buckets) > self.size:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(name)
            bucket.refill(self.rate, now)
        return bucket


def source_prefix(ip: str) -> str:
    """The network a source is limited with: its /24 (IPv4) or /64 (IPv6).

    An IPv4-mapped IPv6 address (a dual-stack socket) counts as the IPv4 address it maps.
    ``ip`` comes from the socket, not from a peer's payload.
    """
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network((address, bits), strict=False))


def source_ip(ip: str) -> str:
    """``ip`` in one canonical spelling (a mapped IPv4 address as plain IPv4)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class RequestLimiter:
    def __init__(self, limits: RequestLimits, now: float) -> None:
        if limits.table_size < 1:
            raise ValueError("the limiter tracks at least one source")
        self.limits = limits
        self._ips = _BucketTable(limits.per_ip, limits.table_size)
        self._prefixes = _BucketTable(limits.per_prefix, limits.table_size)
        self._total = _Bucket(limits.total.burst, now)
        self.refused = 0

    def tracked(self) -> tuple[int, int]:
        """(sources, prefixes) held in the tables now."""
        return len(self._ips), len(self._prefixes)

    def admit(self, ip: str, now: float) -> bool:
        """Whether to answer one request from ``ip`` now; admitting it spends its tokens."""
        self._total.refill(self.limits.total, now)
        by_ip = self._ips.get(source_ip(ip), now)
        by_prefix = self._prefixes.get(source_prefix(ip), now)
        buckets = (by_ip, by_prefix, self._total)
        if any(bucket.tokens < 1.0 for bucket in buckets):
            self.refused += 1
            return False
        for bucket in buckets:
            bucket.tokens -= 1.0
        return True
