"""Where the node's UDP port sent lately (for dial-back: daemon/dialback.py).

A stateful firewall or NAT on our side lets in, for a while, what comes back from an
address our port sent to (Linux conntrack keeps a UDP flow 30 s, 180 s once it saw
traffic both ways). So a datagram from such an address proves nothing about the way in
from elsewhere. A peer can make our port send to an address of its choosing without a
connection: naming it as a DHT contact or a punch candidate, or by a connection that has
closed or moved since. Every send of the port is noted (QUIC per destination run, the
DHT's, punches), and a dial-back probe from any of them is not counted. Conntrack also
keeps a flow alive on what comes in, so a destination's time is refreshed by each receive
batch from it (a peer sending from there keeps our firewall open to it, as it keeps this
record).
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from p2pfs.address import plain_address

KEEP = 180.0
"""How long a destination counts: the longest a conntrack UDP flow lives unrefreshed."""
LIMIT = 16384
"""Destinations kept. More within KEEP (anyone can make our port answer spoofed sources:
a Retry to each forged Initial) and the record no longer says where we did not send: until
KEEP after the last such overflow, every address counts as sent to, and a dial-back that
comes then decides nothing either way (``overflowed``)."""
PORTS_PER_HOST = 64
"""Ports of one host kept one by one; past that the host counts with every port (one
entry: its port 0). So a single host changing its source port for each Initial cannot
overflow the record; only sources forged across LIMIT / PORTS_PER_HOST addresses can."""


class RecentDestinations:
    """Addresses sent to within KEEP seconds, oldest first. ``note`` is called on the send
    path (the trio thread's transmits, the DHT thread's sends): O(1) under a lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sent: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._ports: dict[str, int] = {}
        """Per host, its entries with a port (not its every-port entry)."""
        self._overflow_until = -math.inf
        self._lock = threading.Lock()

    def note(self, address: tuple[Any, ...], now: float | None = None) -> None:
        key = _key(address)
        when = self._clock() if now is None else now
        with self._lock:
            sent = self._sent
            if key in sent:  # the common case: a destination we keep sending to
                sent.move_to_end(key)
                sent[key] = max(when, sent[key])  # two threads' clocks read a moment apart
                return
            while sent and when - next(iter(sent.values())) >= KEEP:
                stale, _at = sent.popitem(last=False)
                if stale[1]:
                    self._forget_port(stale[0])
            every_port = (key[0], 0)
            if every_port in sent:  # the host counts with every port already
                sent.move_to_end(every_port)
                sent[every_port] = max(when, sent[every_port])
                return
            if len(sent) >= LIMIT:
                self._overflow_until = max(self._overflow_until, when + KEEP)
                return
            if self._ports.get(key[0], 0) >= PORTS_PER_HOST:
                key = (key[0], 0)
            else:
                self._ports[key[0]] = self._ports.get(key[0], 0) + 1
            sent[key] = when

    def _forget_port(self, host: str) -> None:
        left = self._ports[host] - 1
        if left:
            self._ports[host] = left
        else:
            del self._ports[host]

    def refresh(self, addresses: set[tuple[Any, ...]], now: float | None = None) -> None:
        """Datagrams came from ``addresses``: those we sent to stay counted from ``now`` (a
        conntrack flow lives on traffic either way). Never adds one."""
        when = self._clock() if now is None else now
        with self._lock:
            sent = self._sent
            for address in addresses:
                key = _key(address)
                for held in (key, (key[0], 0)):
                    if held in sent:
                        sent.move_to_end(held)
                        sent[held] = max(when, sent[held])

    def overflowed(self) -> bool:
        """Whether the record is overflowing (LIMIT): it says nothing of where we did not
        send."""
        return self._clock() < self._overflow_until

    def includes(self, host: str, port: int) -> bool:
        """Whether ``host``:``port`` (however written: a v4-mapped IPv6 address is its
        IPv4 one, a zone is dropped) was sent to within KEEP seconds; True while the
        record has overflowed."""
        wanted = _plain(host)
        now = self._clock()
        with self._lock:
            if now < self._overflow_until:
                return True
            candidates = [(k, at) for k, at in self._sent.items() if k[1] in (port, 0)]
        return any(now - at < KEEP and _plain(k[0]) == wanted for k, at in candidates)

    def __len__(self) -> int:
        return len(self._sent)


def _key(address: tuple[Any, ...]) -> tuple[str, int]:
    """An address as the receive path writes it: a v4-mapped IPv6 host (as DHT contacts
    and punch candidates parse) as its IPv4 one, so what comes in from it refreshes it."""
    host = str(address[0])
    if host.startswith("::ffff:"):
        host = str(plain_address(host) or host)
    return host, int(address[1])


def _plain(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    return plain_address(host) or host
