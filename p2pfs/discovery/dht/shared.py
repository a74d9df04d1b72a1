"""The DHT on the node's one UDP port: an asyncio transport over the QUIC endpoint's socket.

The endpoint (trio, ``net/endpoint.py``) reads every datagram of the node's port and routes
those whose first byte is rpcudp's ``0x00``/``0x01`` (never a QUIC packet, whose fixed bit
0x40 is set) to ``SharedSocketTransport.deliver``. That runs on the endpoint's receive path,
so it only queues the datagram and wakes the DHT's loop; ``DhtProtocol.datagram_received``
then sees it exactly as from a socket of its own, with its rate limits, reply checks and
``_untrusted`` parsing unchanged. Sending goes straight to the shared socket from the DHT's
thread (``SharedPort.send_threadsafe``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

from p2pfs.discovery.dht.messages import CLIENT_REQUEST, MAX_DATAGRAM, REQUEST, RESPONSE

logger = logging.getLogger(__name__)

DHT_FIRST_BYTES = bytes([REQUEST, RESPONSE, CLIENT_REQUEST])
"""What the shared port routes to the DHT (protocol/WIRE.md "One UDP port")."""
QUEUE_LIMIT = 1024
"""Datagrams waiting for the DHT's loop; beyond, new ones are dropped, as a full socket
buffer would. With oversized ones never queued this bounds the queue at 4 MiB."""


class SharedPort(Protocol):
    """What the DHT needs of the endpoint that owns the node's UDP socket."""

    @property
    def local_address(self) -> tuple[str, int]: ...

    @property
    def families(self) -> frozenset[socket.AddressFamily]: ...

    def set_datagram_handler(
        self, first_bytes: bytes, handler: Callable[[bytes, Any], None] | None
    ) -> None: ...

    def send_threadsafe(self, data: bytes, address: Any) -> None: ...


class SharedSocketTransport(asyncio.DatagramTransport):
    """A datagram transport for ``protocol`` that shares ``port``'s socket.

    Built on the DHT's loop; ``deliver`` is the only method called from another thread
    (the endpoint's), and it touches only a deque (whose appends and pops are atomic) and a
    flag, then ``call_soon_threadsafe`` at most once per batch of datagrams.
    """

    def __init__(
        self, port: SharedPort, protocol: asyncio.DatagramProtocol, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__()
        self._port = port
        self._protocol = protocol
        self._loop = loop
        self._queue: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._scheduled = False
        self._closing = False
        self.dropped = 0
        """Datagrams not handed over: queue full, too long, or the DHT closing (approximate:
        written by the endpoint's thread)."""
        protocol.connection_made(self)

    # ---- the endpoint's side (trio thread) -------------------------------------------------

    def deliver(self, data: bytes, addr: Any) -> None:
        """Queue one datagram for the DHT's loop; never blocks, never raises."""
        # Longer ones are dropped unread by the DHT anyway; refusing them here keeps the
        # queue's memory bounded by QUEUE_LIMIT x MAX_DATAGRAM.
        if self._closing or len(data) > MAX_DATAGRAM or len(self._queue) >= QUEUE_LIMIT:
            self.dropped += 1
            return
        self._queue.append((data, addr))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed under us: the DHT has stopped
                self._closing = True

    # ---- the DHT's loop ------------------------------------------------------------------

    def _drain(self) -> None:
        # Cleared before draining: a datagram queued after this line schedules another
        # drain, one queued before it is drained here; none waits unseen.
        self._scheduled = False
        queue = self._queue
        while queue and not self._closing:
            data, addr = queue.popleft()
            self._protocol.datagram_received(data, addr)

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        self._port.send_threadsafe(bytes(data), addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self._port.local_address
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop handing datagrams over and sending; the socket stays the endpoint's. The
        owner also removes the endpoint's route (from trio) so nothing is queued after."""
        if self._closing:
            return
        self._closing = True
        self._queue.clear()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()
