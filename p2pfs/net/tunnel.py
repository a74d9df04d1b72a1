"""A tunnel: one end-to-end QUIC connection's datagrams carried on a relay's control stream.

The endpoint gives each tunnel a synthetic address from 100::/64 (RFC 6666 discard-only,
see connection.TUNNEL_PREFIX). Connections on it are ordinary connections: ``transmit``
hands their datagrams for that address to the tunnel, which frames them onto the stream
(DATA frames, net/control.py); datagrams read from the stream go through the endpoint's
normal dispatch. So the relay in between sees only the end-to-end connection's ciphertext,
and both ends authenticate each other as on any path.

The tunnel behaves like a UDP path: its send queue is bounded and a datagram beyond it is
dropped, for QUIC's loss recovery to resend (a reliable stream below would otherwise buffer
without limit behind a slow relay).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
from collections import deque
from collections.abc import Callable

import trio

from p2pfs.errors import ConnectionClosedError, LocalProtocolError, StreamResetError
from p2pfs.net.boundary import describe, first_leaf, split_fatal
from p2pfs.net.connection import Address
from p2pfs.net.control import ControlError, Data, Decoder, encode_datagrams
from p2pfs.net.stream import Stream

logger = logging.getLogger(__name__)

SEND_QUEUE_DATAGRAMS = 512
"""Datagrams waiting for the stream (~700 KB): a window's worth; beyond, UDP-like loss."""
READ_SIZE = 64 * 1024
_TUNNEL_BASE = int(ipaddress.IPv6Address("100::"))
_numbers = itertools.count(1)

Dispatch = Callable[[list[tuple[bytes, Address]], float], None]


def tunnel_address() -> Address:
    """A fresh synthetic address, unique in this process."""
    return (str(ipaddress.IPv6Address(_TUNNEL_BASE + next(_numbers))), 1)


class Tunnel:
    def __init__(self, stream: Stream, label: str, leftover: bytes = b"") -> None:
        self.stream = stream
        self._leftover = leftover
        self.address = tunnel_address()
        self.label = label
        """Who is at the other end, through which relay (for logs)."""
        self._queue: deque[bytes] = deque()
        self._wakeup = trio.Event()
        self.closed = trio.Event()
        self.dropped = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<Tunnel {self.address[0]} {self.label}>"

    def send(self, datagram: bytes) -> None:
        if self.closed.is_set():
            return
        if len(self._queue) >= SEND_QUEUE_DATAGRAMS:
            self.dropped += 1
            return
        self._queue.append(datagram)
        self._wakeup.set()

    def close(self) -> None:
        """End the tunnel (its task resets the stream and leaves)."""
        self.closed.set()
        self._wakeup.set()

    async def run(self, dispatch: Dispatch) -> None:
        """Pump both ways until the stream ends or ``close``. A failure boundary: whatever
        the relay or the peer does ends this tunnel alone, with one log line."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, dispatch, nursery.cancel_scope)
                nursery.start_soon(self._write, nursery.cancel_scope)
        except BaseException as exc:
            fatal, failure = split_fatal(exc)
            if failure is not None:
                self._failed(failure)
            if fatal is exc:
                raise
            if fatal is not None:
                raise fatal from None
        finally:
            self.closed.set()
            self.stream.reset(0)

    def _failed(self, failure: BaseException) -> None:
        leaf = first_leaf(failure)
        if isinstance(leaf, ConnectionClosedError | StreamResetError | LocalProtocolError):
            logger.debug("%r ended: %s", self, leaf)
        elif isinstance(leaf, ControlError):
            logger.info("%r: the far side broke the framing: %s", self, leaf)
        else:
            logger.error("%r failed: %s", self, describe(failure))

    async def _read(self, dispatch: Dispatch, scope: trio.CancelScope) -> None:
        decoder = Decoder()
        data, self._leftover = self._leftover, b""
        while True:
            if not data:
                data = await self.stream.receive_some(READ_SIZE)
            if not data:
                logger.debug("%r: the far side ended the tunnel", self)
                scope.cancel()
                return
            self.bytes_received += len(data)
            decoder.feed(data)
            batch: list[tuple[bytes, Address]] = []
            while (message := decoder.next_untrusted()) is not None:
                if not isinstance(message, Data):
                    raise ControlError(f"{type(message).__name__} inside a tunnel")
                batch.append((message.datagram, self.address))
            if batch:
                dispatch(batch, trio.current_time())
            data = b""

    async def _write(self, scope: trio.CancelScope) -> None:
        while not self.closed.is_set():
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                payload = encode_datagrams(batch)
                self.bytes_sent += len(payload)
                await self.stream.send_all(payload)
        scope.cancel()
