"""Who gets connection state on a server: half-open handshakes and authenticated peers.

Sans-I/O bookkeeping for the endpoint (time comes in as a parameter):

- An Initial that proves its source address (a Retry token we issued) is *validated*; one
  that does not may come from a spoofed address, so it gets state only while the endpoint is
  not busy and its address holds few half-open handshakes. Otherwise it is answered with a
  Retry, which costs us a header parse and one ~60-byte packet and holds nothing.
- Validated handshakes are bounded per address; when every slot is taken, the oldest
  unvalidated one makes room (the ones a spoofer can create).
- Authenticated incoming connections are bounded per address and in total.
- "Per address" means one IPv4 address or one IPv6 /64: a host picks any address in its
  /64 at will (as the DHT's limits count it), so limits per IPv6 address would not bind.
- Retry tokens are HMACs over the address, the client's first destination id and our Retry's
  source id, with a timestamp: stateless, and only the address they were sent to can use one.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import Generic, TypeVar

from p2pfs.errors import RemoteProtocolError
from p2pfs.net.engine import TransportConfig

C = TypeVar("C")
TOKEN_VERSION = 1
MAC_LEN = 16
MAX_CID_LEN = 20


def source_of(ip: str) -> str:
    """What the per-address limits count: an IPv4 address, or an IPv6 address's /64 (a
    link-local one by itself: every neighbour on a link shares fe80::/64)."""
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if address.is_link_local:
        return ip
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


class Admit(enum.Enum):
    ACCEPT = "accept"
    RETRY = "retry"
    DROP = "drop"


@dataclass(slots=True)
class _Slot:
    ip: str
    validated: bool


class Admission(Generic[C]):
    """Slots for one endpoint's incoming connections (``C``: the connection type)."""

    def __init__(self, config: TransportConfig, key: bytes) -> None:
        self._config = config
        self._key = key
        self._pending: dict[C, _Slot] = {}
        self._pending_ip: Counter[tuple[str, bool]] = Counter()
        self._incoming: dict[C, str] = {}
        self._incoming_ip: Counter[str] = Counter()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def incoming(self) -> int:
        return len(self._incoming)

    # -- half-open handshakes -------------------------------------------------------------

    def initial(self, ip: str, validated: bool) -> Admit:
        """What to do with an Initial that names no connection yet."""
        ip = source_of(ip)
        config = self._config
        if not validated:
            if (
                self.pending >= config.retry_threshold
                or self.pending >= config.max_pending_connections
                or self._pending_ip[(ip, False)] >= config.max_pending_per_ip
            ):
                return Admit.RETRY
            return Admit.ACCEPT
        if self._pending_ip[(ip, True)] >= config.max_pending_per_ip:
            return Admit.DROP
        if self.pending >= config.max_pending_connections and self.oldest_unvalidated() is None:
            return Admit.DROP
        return Admit.ACCEPT

    def oldest_unvalidated(self) -> C | None:
        """The half-open handshake to evict when a validated one needs its slot."""
        for conn, slot in self._pending.items():
            if not slot.validated:
                return conn
        return None

    def add_pending(self, conn: C, ip: str, validated: bool) -> None:
        ip = source_of(ip)
        self._pending[conn] = _Slot(ip, validated)
        self._pending_ip[(ip, validated)] += 1

    def pending_over(self, conn: C) -> None:
        """``conn`` authenticated, failed or was evicted: its slot is free."""
        slot = self._pending.pop(conn, None)
        if slot is not None:
            key = (slot.ip, slot.validated)
            self._pending_ip[key] -= 1
            if self._pending_ip[key] <= 0:
                del self._pending_ip[key]

    # -- authenticated connections --------------------------------------------------------

    def authenticated(self, conn: C, ip: str) -> bool:
        """Count ``conn`` as an incoming peer; False if its address or the node is full."""
        ip = source_of(ip)
        self.pending_over(conn)
        if (
            self._incoming_ip[ip] >= self._config.max_connections_per_ip
            or self.incoming >= self._config.max_connections
        ):
            return False
        self._incoming[conn] = ip
        self._incoming_ip[ip] += 1
        return True

    def finished(self, conn: C) -> None:
        self.pending_over(conn)
        ip = self._incoming.pop(conn, None)
        if ip is not None:
            self._incoming_ip[ip] -= 1
            if self._incoming_ip[ip] <= 0:
                del self._incoming_ip[ip]

    # -- Retry tokens ---------------------------------------------------------------------

    def issue_token(
        self, address: tuple[str, int], original_cid: bytes, retry_cid: bytes, now: float
    ) -> bytes:
        stamp = int(now * 1000).to_bytes(8, "big")
        body = bytes((TOKEN_VERSION, len(original_cid))) + original_cid + stamp
        return body + self._mac(body, address, retry_cid)

    def original_cid_untrusted(
        self, token: bytes, address: tuple[str, int], retry_cid: bytes, now: float
    ) -> bytes:
        """The client's first destination id, if ``token`` is one we issued to ``address``
        for ``retry_cid`` within the token lifetime; else RemoteProtocolError."""
        if len(token) < 2 or token[0] != TOKEN_VERSION:
            raise RemoteProtocolError("not a retry token of ours")
        cid_len = token[1]
        if cid_len > MAX_CID_LEN or len(token) != 2 + cid_len + 8 + MAC_LEN:
            raise RemoteProtocolError("retry token of the wrong length")
        body, mac = token[:-MAC_LEN], token[-MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(body, address, retry_cid)):
            raise RemoteProtocolError("retry token does not verify")
        issued = int.from_bytes(body[2 + cid_len :], "big") / 1000
        if not issued <= now <= issued + self._config.retry_token_lifetime:
            raise RemoteProtocolError("retry token expired")
        return body[2 : 2 + cid_len]

    def _mac(self, body: bytes, address: tuple[str, int], retry_cid: bytes) -> bytes:
        where = f"{address[0]}|{address[1]}".encode()
        message = body + bytes((len(retry_cid),)) + retry_cid + where
        return hmac.new(self._key, message, hashlib.sha256).digest()[:MAC_LEN]
