"""Where the node's UDP port sent lately (for dial-back: daemon/dialback.py).

A stateful firewall or NAT on our side lets in, for a while, what comes back from an
address our port sent to (Linux conntrack keeps a UDP flow 30 s, 180 s once it saw
traffic both ways). So a datagram from such an address proves nothing about the way in
from elsewhere. A peer can make our port send to an address of its choosing without a
connection: naming it as a DHT contact or a punch candidate, or by a connection that has
closed or moved since. Every send of the port is noted (QUIC per destination run, the
DHT's, punches), and a dial-back probe from any of them is not counted.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from typing import Any

from p2pfs.address import plain_address

KEEP = 180.0
"""How long a destination counts: the longest a conntrack UDP flow lives unrefreshed."""
LIMIT = 16384
"""Destinations kept before the stale ones are swept (more are kept while fresh)."""


class RecentDestinations:
    """Addresses sent to within KEEP seconds. ``note`` is called on the send path (the
    trio thread's transmits, the DHT thread's sends): one dict store under a lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sent: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def note(self, address: tuple[Any, ...], now: float | None = None) -> None:
        key = (str(address[0]), int(address[1]))
        when = self._clock() if now is None else now
        with self._lock:
            self._sent[key] = when
            if len(self._sent) > LIMIT:
                self._sent = {k: at for k, at in self._sent.items() if when - at < KEEP}

    def includes(self, host: str, port: int) -> bool:
        """Whether ``host``:``port`` (however written: a v4-mapped IPv6 address is its
        IPv4 one, a zone is dropped) was sent to within KEEP seconds."""
        wanted = _plain(host)
        now = self._clock()
        with self._lock:
            candidates = [(k, at) for k, at in self._sent.items() if k[1] == port]
        return any(now - at < KEEP and _plain(k[0]) == wanted for k, at in candidates)

    def __len__(self) -> int:
        return len(self._sent)


def _plain(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    return plain_address(host) or host
