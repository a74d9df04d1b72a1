"""A tunnel: one end-to-end QUIC connection's datagrams carried through a relay circuit.

The relay names each circuit with a random 8-byte id when it sets the circuit up on a
control stream (net/control.py). From then on the two ends and the relay exchange plain
UDP datagrams on the nodes' one port, ``0x03 | circuit id | end-to-end QUIC datagram``
(protocol/WIRE.md "Relay datagrams"), each sent to and accepted from only the address of
the end's authenticated connection with the relay. The relay forwards them without a
second layer of encryption, a queue or a copy beyond the socket's: it sees only the
end-to-end connection's ciphertext, and both ends authenticate each other as on any path.

The endpoint gives each tunnel a synthetic address from 100::/64 (RFC 6666 discard-only,
see connection.TUNNEL_PREFIX). Connections on it are ordinary connections: ``transmit``
wraps their datagrams for that address (``wrap``), and the receive path unwraps datagrams
of the circuit into the endpoint's normal dispatch. The control stream stays open as the
circuit's lifetime: when it ends, the circuit and its connection end.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
from collections.abc import Callable

import trio

from p2pfs.errors import ConnectionClosedError, LocalProtocolError, StreamResetError
from p2pfs.net.boundary import describe, first_leaf, split_fatal
from p2pfs.net.connection import Address
from p2pfs.net.control import CIRCUIT_LEN, RELAY_DATAGRAM, ControlError
from p2pfs.net.stream import Stream

logger = logging.getLogger(__name__)

HEADER_LEN = 1 + CIRCUIT_LEN
"""Bytes a relayed datagram adds to the end-to-end one."""
_TUNNEL_BASE = int(ipaddress.IPv6Address("100::"))
_numbers = itertools.count(1)


def tunnel_address() -> Address:
    """A fresh synthetic address, unique in this process."""
    return (str(ipaddress.IPv6Address(_TUNNEL_BASE + next(_numbers))), 1)


class Tunnel:
    def __init__(
        self, stream: Stream, circuit: bytes, relay: Callable[[], Address], label: str
    ) -> None:
        if len(circuit) != CIRCUIT_LEN:
            raise LocalProtocolError("a circuit id is 8 bytes")
        self.stream = stream
        self.circuit = circuit
        self._relay = relay
        """The relay's address as our connection to it sees it now (it may migrate)."""
        self._header = bytes([RELAY_DATAGRAM]) + circuit
        self.address = tunnel_address()
        self.label = label
        """Who is at the other end, through which relay (for logs)."""
        self.closed = trio.Event()
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<Tunnel {self.address[0]} {self.label}>"

    @property
    def relay_address(self) -> Address:
        return self._relay()

    def wrap(self, datagram: bytes) -> tuple[bytes, Address]:
        """The datagram to send to the relay for one of the end-to-end connection's."""
        self.bytes_sent += len(datagram)
        return self._header + datagram, self._relay()

    def from_relay(self, source: Address) -> bool:
        """Whether a datagram for this circuit came from the relay (not a spoofer)."""
        relay = self._relay()
        return bool(source[0] == relay[0] and source[1] == relay[1])

    def close(self) -> None:
        """End the tunnel (its task resets the stream and leaves)."""
        self.closed.set()

    async def run(self) -> None:
        """Hold the circuit until its control stream ends or ``close``. A failure boundary:
        whatever the relay does ends this tunnel alone, with one log line."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_stream, nursery.cancel_scope)
                await self.closed.wait()
                nursery.cancel_scope.cancel()
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
            logger.info("%r: the relay broke the circuit's rules: %s", self, leaf)
        else:
            logger.error("%r failed: %s", self, describe(failure))

    async def _watch_stream(self, scope: trio.CancelScope) -> None:
        """Nothing more is said on a circuit's stream: its end is the circuit's end."""
        while await self.stream.receive_some(1024):
            raise ControlError("data on an established circuit's stream")
        logger.debug("%r: the relay ended the circuit", self)
        scope.cancel()
