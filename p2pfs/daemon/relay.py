"""Relays: reaching nodes that nobody can dial directly (SPEC "Relays and hole punching").

- A node started with ``--relay`` serves ``RelayService``: an authenticated peer may
  REGISTER (it is then reachable through this relay while that stream stays open) or
  CONNECT to a registered NodeId. The relay names the circuit with a random id, opens a
  control stream to the target with INCOMING (the source's proven NodeId and the id), and
  once the target ACCEPTs, forwards relay datagrams of that circuit between the addresses
  of the two ends' connections with it, unread and unqueued: the end-to-end QUIC
  connection inside is the two ends' own (net/tunnel.py). It forwards only between two
  nodes that each hold an authenticated connection to it, to a NodeId (never to an
  address), within per-client limits (``RelayLimits``).
- While a node is registered, the relay announces itself in the private DHT under a key
  derived from that node's NodeId, so peers that know only the NodeId find the way in.
The registering and dialling side is ``relayclient.RelayClient``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from p2pfs.discovery.keys import relay_for_discovery_key
from p2pfs.errors import (
    ConnectionClosedError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamResetError,
)
from p2pfs.ids import NodeId
from p2pfs.net import Endpoint, PeerConnection, Stream
from p2pfs.net.boundary import describe, first_leaf, split_fatal
from p2pfs.net.connection import Address
from p2pfs.net.control import (
    CIRCUIT_LEN,
    RELAY_DATAGRAM,
    Accept,
    Connect,
    ControlError,
    ControlKind,
    ControlMessage,
    Decoder,
    Incoming,
    Refuse,
    RefuseCode,
    Register,
    encode,
)
from p2pfs.net.tunnel import HEADER_LEN

from .ratelimit import TokenBucket

logger = logging.getLogger(__name__)

MiB = 1 << 20
FIRST_FRAME_TIMEOUT = 10.0
"""A control stream's first frame comes at once from an honest peer."""
TARGET_TIMEOUT = 5.0
"""How long the relay waits for a target to accept a circuit."""
BUDGET_MEMORY = 4096
"""Clients whose byte use the relay remembers (oldest forgotten first)."""


class RelayRefused(RemoteProtocolError):
    def __init__(self, refusal: Refuse) -> None:
        super().__init__(f"relay refused: {refusal.code.name.lower()} ({refusal.reason})")
        self.code = refusal.code


@dataclass(frozen=True, slots=True)
class RelayLimits:
    rate: int = 8 * MiB
    """Bytes per second one client's circuits may carry (both directions count)."""
    budget: int = 4096 * MiB
    """Bytes one client may move through the relay in all; beyond, its circuits are cut off
    and new ones refused (BUSY) until the relay forgets it (restart, or BUDGET_MEMORY newer
    clients)."""
    circuits: int = 8
    """Concurrent circuits per client (as either end)."""
    total_circuits: int = 1024


@dataclass(slots=True)
class _Client:
    bucket: TokenBucket
    used: int = 0
    circuits: int = 0


@dataclass(slots=True)
class RelayStats:
    registered: int = 0
    circuits: int = 0
    circuits_total: int = 0
    bytes_forwarded: int = 0
    datagrams_forwarded: int = 0
    datagrams_dropped: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    cut_off: int = 0


class BudgetExceeded(Exception):
    """A client used up its byte budget: its circuit ends."""


async def read_first_untrusted(stream: Stream, decoder: Decoder) -> ControlMessage:
    """The first message of a control stream, within FIRST_FRAME_TIMEOUT."""
    with trio.move_on_after(FIRST_FRAME_TIMEOUT):
        while True:
            message = decoder.next_untrusted()
            if message is not None:
                return message
            data = await stream.receive_some(4096)
            if not data:
                raise ControlError("control stream ended before its first message")
            decoder.feed(data)
    raise ControlError("no control message in time")


async def guard(what: str, run: Callable[[], Awaitable[None]], stream: Stream) -> None:
    """A control stream is a failure boundary (GUIDE rule 12): anything but cancellation
    ends it alone, with one log line."""
    try:
        await run()
    except BaseException as exc:
        fatal, failure = split_fatal(exc)
        if failure is not None:
            leaf = first_leaf(failure)
            if isinstance(
                leaf, ConnectionClosedError | StreamResetError | LocalProtocolError | BudgetExceeded
            ):
                logger.debug("%s ended: %s", what, leaf)
            elif isinstance(leaf, RemoteProtocolError):
                logger.info("%s: the peer broke the protocol: %s", what, leaf)
            else:
                logger.error("%s failed: %s", what, describe(failure))  # noqa: TRY400 -- one line
            stream.reset(int(RefuseCode.UNAVAILABLE))
        if fatal is exc:
            raise
        if fatal is not None:
            raise fatal from None


@dataclass(slots=True)
class _Circuit:
    """A circuit the relay forwards datagrams on, between the connections of its two ends."""

    ends: tuple[PeerConnection, PeerConnection]
    clients: tuple[_Client, _Client]
    cut_off: trio.Event = field(default_factory=trio.Event)


Announce = Callable[[bytes], Awaitable[object]]
"""Announce (or withdraw) this node under a discovery key in the private DHT."""


class RelayService:
    """The relay side (``--relay``)."""

    def __init__(
        self,
        limits: RelayLimits,
        *,
        announce: Announce | None = None,
        withdraw: Announce | None = None,
    ) -> None:
        self.limits = limits
        self._announce = announce
        self._withdraw = withdraw
        self.stats = RelayStats()
        self._registered: dict[NodeId, PeerConnection] = {}
        self._clients: OrderedDict[NodeId, _Client] = OrderedDict()
        self._circuits: dict[bytes, _Circuit] = {}
        self._endpoint: Endpoint | None = None
        self._outgoing: list[tuple[bytes, Address]] = []
        """Datagrams forwarded from the receive batch in hand, sent together once it is
        handled (in runs of one size to one address: one GSO send each)."""
        self._token: trio.lowlevel.TrioToken | None = None

    def attach(self, endpoint: Endpoint) -> None:
        """Forward relay datagrams arriving on ``endpoint``'s port."""
        self._endpoint = endpoint
        self._token = trio.lowlevel.current_trio_token()
        endpoint.set_datagram_handler(bytes([RELAY_DATAGRAM]), self._forward)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._endpoint is not None and outgoing:
            self._endpoint.transmit(outgoing)

    def info(self) -> dict[str, object]:
        self.stats.registered = len(self._registered)
        return {
            "registered": self.stats.registered,
            "circuits": self.stats.circuits,
            "circuits_total": self.stats.circuits_total,
            "bytes_forwarded": self.stats.bytes_forwarded,
            "datagrams_forwarded": self.stats.datagrams_forwarded,
            "datagrams_dropped": self.stats.datagrams_dropped,
            "refused": dict(self.stats.refused),
            "cut_off": self.stats.cut_off,
            "clients": {
                str(node): {"bytes": client.used, "circuits": client.circuits}
                for node, client in self._clients.items()
            },
        }

    def _client(self, node: NodeId) -> _Client:
        client = self._clients.pop(node, None)
        if client is None:
            client = _Client(TokenBucket(self.limits.rate))
        self._clients[node] = client
        while len(self._clients) > BUDGET_MEMORY:
            self._clients.popitem(last=False)
        return client

    def _forward(self, data: bytes, source: Address) -> None:
        """One relay datagram (on the endpoint's receive path: no waiting, no raising).
        Only an end of the circuit may send on it, only to the other end, within both
        ends' rate (beyond, the datagram is dropped, as a full UDP path would)."""
        stats = self.stats
        circuit = self._circuits.get(data[1:HEADER_LEN])
        if circuit is None or self._endpoint is None or circuit.cut_off.is_set():
            stats.datagrams_dropped += 1
            return
        first, second = circuit.ends
        if _same_address(source, first.remote_address):
            destination = second.remote_address
        elif _same_address(source, second.remote_address):
            destination = first.remote_address
        else:
            stats.datagrams_dropped += 1
            return
        size = len(data) - HEADER_LEN
        now = trio.current_time()
        if not all(client.bucket.take_if_available(size, now) for client in circuit.clients):
            stats.datagrams_dropped += 1
            return
        for client in circuit.clients:
            client.used += size
            if client.used > self.limits.budget:
                stats.cut_off += 1
                circuit.cut_off.set()
                return
        if not self._outgoing and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._flush)
        self._outgoing.append((data, destination))
        stats.bytes_forwarded += size
        stats.datagrams_forwarded += 1

    async def handle(
        self, conn: PeerConnection, stream: Stream, first: ControlMessage, decoder: Decoder
    ) -> None:
        if isinstance(first, Register):
            await self._register(conn, stream)
        elif isinstance(first, Connect):
            await self._connect(conn, stream, NodeId(first.target))
        else:
            await self._refuse(stream, RefuseCode.UNEXPECTED, "REGISTER or CONNECT only")

    async def _refuse(self, stream: Stream, code: RefuseCode, reason: str) -> None:
        name = code.name.lower()
        self.stats.refused[name] = self.stats.refused.get(name, 0) + 1
        await stream.send_all(encode(Refuse(code, reason)))
        await stream.send_eof()

    async def _register(self, conn: PeerConnection, stream: Stream) -> None:
        node = conn.peer_id
        self._registered[node] = conn
        logger.info("relay: %s registered from %s", node.short(), conn.remote_address)
        key = relay_for_discovery_key(node.raw)
        try:
            await stream.send_all(encode(Accept()))
            async with trio.open_nursery() as nursery:
                if self._announce is not None:
                    nursery.start_soon(self._announce, key)
                # Registered while the stream is open; nothing more is said on it.
                while await stream.receive_some(1024):
                    raise ControlError("data on a registration stream")
                nursery.cancel_scope.cancel()
        finally:
            if self._registered.get(node) is conn:
                del self._registered[node]
                logger.info("relay: %s unregistered", node.short())
                if self._withdraw is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await self._withdraw(key)

    async def _connect(self, conn: PeerConnection, stream: Stream, target: NodeId) -> None:
        source = conn.peer_id
        target_conn = self._registered.get(target)
        if target_conn is None or target_conn.is_closed:
            await self._refuse(stream, RefuseCode.NOT_REGISTERED, "no such node registered here")
            return
        if target == source:
            await self._refuse(stream, RefuseCode.UNEXPECTED, "a circuit to yourself")
            return
        clients = (self._client(source), self._client(target))
        busy = self.stats.circuits >= self.limits.total_circuits or any(
            c.circuits >= self.limits.circuits or c.used >= self.limits.budget for c in clients
        )
        if busy:
            await self._refuse(stream, RefuseCode.BUSY, "circuit or byte limit reached")
            return
        for client in clients:
            client.circuits += 1
        self.stats.circuits += 1
        self.stats.circuits_total += 1
        circuit_id = self._new_circuit_id()
        try:
            far_stream = await self._open_to_target(target_conn, source, circuit_id)
            if far_stream is None:
                await self._refuse(stream, RefuseCode.UNAVAILABLE, "target did not accept")
                return
            circuit = _Circuit((conn, target_conn), clients)
            self._circuits[circuit_id] = circuit
            try:
                await stream.send_all(encode(Accept(circuit_id)))
                logger.info("relay: circuit %s -> %s", source.short(), target.short())
                await _hold(circuit, stream, far_stream)
            finally:
                del self._circuits[circuit_id]
                far_stream.reset(0)
        finally:
            for client in clients:
                client.circuits -= 1
            self.stats.circuits -= 1

    def _new_circuit_id(self) -> bytes:
        while True:
            circuit_id = os.urandom(CIRCUIT_LEN)
            if circuit_id not in self._circuits:
                return circuit_id

    async def _open_to_target(
        self, target_conn: PeerConnection, source: NodeId, circuit_id: bytes
    ) -> Stream | None:
        far = await target_conn.open_control(
            ControlKind.RELAY, encode(Incoming(source.raw, circuit_id))
        )
        with trio.move_on_after(TARGET_TIMEOUT):
            answer = await read_first_untrusted(far, Decoder())
            if isinstance(answer, Accept):
                return far
        far.reset(int(RefuseCode.UNAVAILABLE))
        return None


async def _hold(circuit: _Circuit, near: Stream, far: Stream) -> None:
    """Keep the circuit while both streams stay open and its ends stay within budget."""
    async with trio.open_nursery() as nursery:
        for stream in (near, far):
            nursery.start_soon(_until_ended, stream, nursery.cancel_scope)
        await circuit.cut_off.wait()
        near.reset(int(RefuseCode.BUSY))
        far.reset(int(RefuseCode.BUSY))
        nursery.cancel_scope.cancel()
        raise BudgetExceeded("a client used up its byte budget")


async def _until_ended(stream: Stream, scope: trio.CancelScope) -> None:
    while await stream.receive_some(1024):
        raise ControlError("data on an established circuit's stream")
    scope.cancel()


def _same_address(a: Address, b: Address) -> bool:
    # IPv6 addresses may come as 4-tuples (host, port, flowinfo, scope id).
    return bool(a[0] == b[0] and a[1] == b[1])
