"""LAN discovery beacons: the datagram codec and the table of what the link said (sans-I/O).

One datagram layout serves three messages (all integers big-endian)::

    magic     4   b"p2LD"
    version   1   1
    type      1   1 ANNOUNCE (periodic, multicast/broadcast), 2 QUERY, 3 ANSWER (unicast)
    flags     1   bit 0 COMPLETE: the prefixes are the sender's whole key set
    node_id  32   the sender's NodeId
    instance  8   random per process start (a restart is a new instance)
    port      2   ANNOUNCE/ANSWER: the sender's QUIC port (1..65535); QUERY: 0
    count     1   number of key prefixes (ANNOUNCE/ANSWER 0..128, QUERY 1..16)
    prefixes  8*count   the first 8 bytes of discovery keys
    (anything after the prefixes is reserved for later versions and ignored)

Keys travel as 8-byte prefixes so one datagram (< 1100 bytes, under any link's MTU) names
128 shares; a node with more rotates through its keys across beacons and answers QUERYs for
any of them, so ``find`` never waits for a rotation. 64 bits make accidental collisions
negligible, and a deliberate false claim gains nothing a full-key claim would not: LAN
beacons are unauthenticated either way, and content hashes check everything fetched.

A provider's address is the datagram's source IP plus the announced port, never an address
from the payload, so nobody can point the link at a third party.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from p2pfs.errors import RemoteProtocolError

MAGIC = b"p2LD"
VERSION = 1
PREFIX_LEN = 8
NODE_ID_LEN = 32
MAX_ANNOUNCE_PREFIXES = 128
MAX_QUERY_PREFIXES = 16
MAX_DATAGRAM = 1400
"""Larger datagrams are dropped before parsing; ours are at most 1,074 bytes."""
FLAG_COMPLETE = 0x01

_HEADER = struct.Struct(">4sBBB32sQHB")
HEADER_LEN = _HEADER.size


class BeaconError(RemoteProtocolError):
    """A datagram on the LAN discovery port that is not a beacon we can read."""


class MessageType(enum.IntEnum):
    ANNOUNCE = 1
    QUERY = 2
    ANSWER = 3


@dataclass(frozen=True, slots=True)
class Beacon:
    type: MessageType
    node_id: bytes
    instance: int
    port: int
    prefixes: tuple[bytes, ...]
    complete: bool = False

    def to_wire(self) -> bytes:
        limit = MAX_QUERY_PREFIXES if self.type is MessageType.QUERY else MAX_ANNOUNCE_PREFIXES
        if len(self.node_id) != NODE_ID_LEN or not 0 <= self.instance < 2**64:
            raise ValueError("beacon: node_id is 32 bytes, instance a u64")
        if len(self.prefixes) > limit or any(len(p) != PREFIX_LEN for p in self.prefixes):
            raise ValueError(f"beacon: at most {limit} prefixes of {PREFIX_LEN} bytes")
        if not 0 <= self.port < 65536:
            raise ValueError("beacon: port out of range")
        flags = FLAG_COMPLETE if self.complete else 0
        header = _HEADER.pack(
            MAGIC,
            VERSION,
            int(self.type),
            flags,
            self.node_id,
            self.instance,
            self.port,
            len(self.prefixes),
        )
        return header + b"".join(self.prefixes)


def parse_beacon_untrusted(data: bytes) -> Beacon:
    """Decode one datagram; raises :class:`BeaconError` only."""
    if len(data) > MAX_DATAGRAM:
        raise BeaconError(f"beacon of {len(data)} bytes is over {MAX_DATAGRAM}")
    if len(data) < HEADER_LEN:
        raise BeaconError(f"beacon of {len(data)} bytes is shorter than its header")
    magic, version, type_, flags, node_id, instance, port, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BeaconError("not a p2pfs beacon (bad magic)")
    if version < VERSION:
        raise BeaconError(f"beacon version {version} is too old (we speak {VERSION})")
    if version > VERSION:
        raise BeaconError(f"beacon version {version} is newer than ours ({VERSION})")
    if type_ not in MessageType.__members__.values():
        raise BeaconError(f"unknown beacon type {type_}")
    kind = MessageType(type_)
    if kind is MessageType.QUERY:
        if not 1 <= count <= MAX_QUERY_PREFIXES:
            raise BeaconError(f"query with {count} prefixes")
    else:
        if count > MAX_ANNOUNCE_PREFIXES:
            raise BeaconError(f"beacon with {count} prefixes")
        if port == 0:
            raise BeaconError("beacon announces port 0")
    end = HEADER_LEN + count * PREFIX_LEN
    if len(data) < end:
        raise BeaconError("beacon is truncated")
    prefixes = tuple(data[i : i + PREFIX_LEN] for i in range(HEADER_LEN, end, PREFIX_LEN))
    # Unknown flag bits are reserved: ignored, like trailing bytes.
    return Beacon(kind, node_id, instance, port, prefixes, bool(flags & FLAG_COMPLETE))


def key_prefix(key: bytes) -> bytes:
    return key[:PREFIX_LEN]


# --- what the link told us -----------------------------------------------------------------


@dataclass(slots=True)
class _Heard:
    instance: int
    port: int
    prefixes: dict[bytes, float] = field(default_factory=dict)
    """prefix -> expiry time."""


@dataclass(frozen=True, slots=True)
class Sighting:
    node_id: bytes
    host: str
    port: int


class LanTable:
    """Who on the link holds which key prefixes, with expiry; time is a parameter.

    Entries are per (NodeId, source host): a node heard over IPv4 and IPv6 is reachable at
    both. Bounded in entries and in prefixes per entry, so a flood of forged beacons costs
    memory once, not without end.
    """

    def __init__(
        self, *, ttl: float, max_entries: int = 512, max_prefixes_per_entry: int = 4096
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_prefixes_per_entry = max_prefixes_per_entry
        self._heard: dict[tuple[bytes, str], _Heard] = {}

    def __len__(self) -> int:
        return len(self._heard)

    def record(self, beacon: Beacon, host: str, now: float) -> None:
        """Note an ANNOUNCE or ANSWER heard from ``host`` (the datagram's source)."""
        if beacon.type is MessageType.QUERY:
            return
        slot = (beacon.node_id, host)
        heard = self._heard.get(slot)
        if heard is None or heard.instance != beacon.instance:
            # New, or restarted: what an earlier instance said no longer holds.
            heard = _Heard(beacon.instance, beacon.port)
            self._heard[slot] = heard
        elif beacon.complete and beacon.type is MessageType.ANNOUNCE:
            # A complete list replaces the old one, so a withdrawn key is gone at once.
            # (ANSWERs carry only the keys asked for and never replace.)
            heard.prefixes.clear()
        heard.port = beacon.port
        expiry = now + self.ttl
        for prefix in beacon.prefixes:
            heard.prefixes.pop(prefix, None)  # re-insert: dict order is oldest first
            heard.prefixes[prefix] = expiry
        while len(heard.prefixes) > self.max_prefixes_per_entry:
            del heard.prefixes[next(iter(heard.prefixes))]
        if not heard.prefixes:
            # A node with no keys is nobody we can fetch from; keeping it only costs memory.
            del self._heard[slot]
        self._evict(now)

    def _evict(self, now: float) -> None:
        self.expire(now)
        while len(self._heard) > self.max_entries:
            oldest = min(self._heard, key=lambda slot: max(self._heard[slot].prefixes.values()))
            del self._heard[oldest]

    def expire(self, now: float) -> None:
        for slot in list(self._heard):
            prefixes = self._heard[slot].prefixes
            for prefix in [p for p, expiry in prefixes.items() if expiry <= now]:
                del prefixes[prefix]
            if not prefixes:
                del self._heard[slot]

    def holders(self, key: bytes, now: float) -> list[Sighting]:
        prefix = key_prefix(key)
        return [
            Sighting(node_id, host, heard.port)
            for (node_id, host), heard in self._heard.items()
            if heard.prefixes.get(prefix, -1.0) > now
        ]


def announce_windows(keys: Iterable[bytes], offset: int) -> tuple[tuple[bytes, ...], bool, int]:
    """The prefixes for the next ANNOUNCE: all of them if they fit (``complete``), else a
    window of ``MAX_ANNOUNCE_PREFIXES`` starting at ``offset``. Returns the next offset."""
    prefixes = sorted({key_prefix(key) for key in keys})
    if len(prefixes) <= MAX_ANNOUNCE_PREFIXES:
        return tuple(prefixes), True, 0
    start = offset % len(prefixes)
    window = (prefixes + prefixes)[start : start + MAX_ANNOUNCE_PREFIXES]
    return tuple(window), False, (start + MAX_ANNOUNCE_PREFIXES) % len(prefixes)


class TokenBucket:
    """At most ``rate`` events per second with bursts of ``burst`` (answers to QUERYs, so a
    forged-source query storm cannot turn us into a reflector)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
