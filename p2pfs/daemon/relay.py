"""Relays: reaching nodes that nobody can dial directly (SPEC "Relays and hole punching").

- A node started with ``--relay`` serves ``RelayService``: an authenticated peer may
  REGISTER (it is then reachable through this relay while that stream stays open) or
  CONNECT to a registered NodeId. The relay opens a control stream to the target with
  INCOMING (the source's proven NodeId), and once the target ACCEPTs it splices the two
  streams, copying bytes it never reads: the end-to-end QUIC connection inside is the two
  ends' own. It forwards only between two nodes that each hold an authenticated connection
  to it, to a NodeId (never to an address), within per-client limits (``RelayLimits``).
- A node started with ``--relay-via HOST:PORT`` keeps a registration with each such relay
  (``RelayClient``), names them in its tickets and ``id``, accepts INCOMING only from relays
  it registered with, and dials others through a relay named in their ticket.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from p2pfs.address import PeerAddress
from p2pfs.errors import (
    ConnectionClosedError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamResetError,
)
from p2pfs.ids import NodeId
from p2pfs.net import Endpoint, PeerConnection, Stream
from p2pfs.net.boundary import describe, first_leaf, split_fatal
from p2pfs.net.control import (
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

from .ratelimit import TokenBucket

logger = logging.getLogger(__name__)

MiB = 1 << 20
FIRST_FRAME_TIMEOUT = 10.0
"""A control stream's first frame comes at once from an honest peer."""
TARGET_TIMEOUT = 5.0
"""How long the relay waits for a target to accept a circuit."""
SPLICE_READ = 64 * 1024
KEEPALIVE = 10.0
"""Ping the relay this often: keeps the connection and every NAT's mapping on the way alive
(Linux conntrack forgets an idle UDP flow after 30 s, many home routers sooner)."""
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
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


class RelayService:
    """The relay side (``--relay``)."""

    def __init__(self, limits: RelayLimits) -> None:
        self.limits = limits
        self.stats = RelayStats()
        self._registered: dict[NodeId, PeerConnection] = {}
        self._clients: OrderedDict[NodeId, _Client] = OrderedDict()

    def info(self) -> dict[str, object]:
        self.stats.registered = len(self._registered)
        return {
            "registered": self.stats.registered,
            "circuits": self.stats.circuits,
            "circuits_total": self.stats.circuits_total,
            "bytes_forwarded": self.stats.bytes_forwarded,
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

    async def handle(
        self, conn: PeerConnection, stream: Stream, first: ControlMessage, decoder: Decoder
    ) -> None:
        if isinstance(first, Register):
            await self._register(conn, stream)
        elif isinstance(first, Connect):
            await self._connect(conn, stream, NodeId(first.target), decoder.take_rest())
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
        try:
            await stream.send_all(encode(Accept()))
            # Registered while the stream is open; nothing more is said on it.
            while await stream.receive_some(1024):
                raise ControlError("data on a registration stream")
        finally:
            if self._registered.get(node) is conn:
                del self._registered[node]
                logger.info("relay: %s unregistered", node.short())

    async def _connect(
        self, conn: PeerConnection, stream: Stream, target: NodeId, leftover: bytes
    ) -> None:
        source = conn.peer_id
        target_conn = self._registered.get(target)
        if target_conn is None or target_conn.is_closed:
            await self._refuse(stream, RefuseCode.NOT_REGISTERED, "no such node registered here")
            return
        if target == source:
            await self._refuse(stream, RefuseCode.UNEXPECTED, "a circuit to yourself")
            return
        ends = (self._client(source), self._client(target))
        busy = self.stats.circuits >= self.limits.total_circuits or any(
            c.circuits >= self.limits.circuits or c.used >= self.limits.budget for c in ends
        )
        if busy:
            await self._refuse(stream, RefuseCode.BUSY, "circuit or byte limit reached")
            return
        for client in ends:
            client.circuits += 1
        self.stats.circuits += 1
        self.stats.circuits_total += 1
        try:
            far = await self._open_to_target(target_conn, source)
            if far is None:
                await self._refuse(stream, RefuseCode.UNAVAILABLE, "target did not accept")
                return
            far_stream, far_rest = far
            await stream.send_all(encode(Accept()))
            logger.info("relay: circuit %s -> %s", source.short(), target.short())
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._copy, stream, far_stream, leftover, ends, nursery)
                    nursery.start_soon(self._copy, far_stream, stream, far_rest, ends, nursery)
            finally:
                far_stream.reset(0)
        finally:
            for client in ends:
                client.circuits -= 1
            self.stats.circuits -= 1

    async def _open_to_target(
        self, target_conn: PeerConnection, source: NodeId
    ) -> tuple[Stream, bytes] | None:
        far = await target_conn.open_control(ControlKind.RELAY, encode(Incoming(source.raw)))
        decoder = Decoder()
        with trio.move_on_after(TARGET_TIMEOUT):
            answer = await read_first_untrusted(far, decoder)
            if isinstance(answer, Accept):
                return far, decoder.take_rest()
        far.reset(int(RefuseCode.UNAVAILABLE))
        return None

    async def _copy(
        self,
        source: Stream,
        sink: Stream,
        first: bytes,
        ends: tuple[_Client, _Client],
        nursery: trio.Nursery,
    ) -> None:
        """Bytes one way, unread, charged to both ends' rate and budget."""
        data = first
        while True:
            if not data:
                data = await source.receive_some(SPLICE_READ)
                if not data:
                    await sink.send_eof()
                    return
            now = trio.current_time()
            delay = 0.0
            for client in ends:
                client.used += len(data)
                delay = max(delay, client.bucket.delay_for(len(data), now))
            if any(client.used > self.limits.budget for client in ends):
                self.stats.cut_off += 1
                source.reset(int(RefuseCode.BUSY))
                sink.reset(int(RefuseCode.BUSY))
                nursery.cancel_scope.cancel()
                raise BudgetExceeded("a client used up its byte budget")
            if delay > 0:
                await trio.sleep(delay)
            await sink.send_all(data)
            self.stats.bytes_forwarded += len(data)
            data = b""


@dataclass(frozen=True, slots=True)
class RelayRoute:
    relay: NodeId
    address: PeerAddress


DialRelay = Callable[[PeerAddress, NodeId | None, object], Awaitable[PeerConnection]]
Release = Callable[[PeerConnection, object], None]


class RelayClient:
    """The registered side (``--relay-via``) and the dialling side of circuits."""

    def __init__(
        self,
        endpoint: Endpoint,
        relays: tuple[PeerAddress, ...],
        dial: DialRelay,
        release: Release,
        nursery: trio.Nursery,
    ) -> None:
        self._endpoint = endpoint
        self._nursery = nursery
        self._relays = relays
        self._dial = dial
        self._release = release
        self._routes: dict[PeerAddress, tuple[RelayRoute, PeerConnection]] = {}

    @property
    def routes(self) -> list[RelayRoute]:
        """The relays this node is registered with now (for tickets and ``id``)."""
        return [route for route, _conn in self._routes.values()]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for address in self._relays:
                nursery.start_soon(self._keep_registered, address)
            task_status.started()

    async def _keep_registered(self, address: PeerAddress) -> None:
        failures = 0
        while True:
            holder = object()
            try:
                conn = await self._dial(address, None, holder)
                try:
                    await self._registered(address, conn)
                    failures = 0
                finally:
                    self._routes.pop(address, None)
                    self._release(conn, holder)
            except RelayRefused as exc:
                logger.warning("relay %s: %s", address, exc)
            except (RemoteProtocolError, ConnectionClosedError, LocalProtocolError) as exc:
                logger.info("relay %s unreachable or lost: %s", address, exc)
            delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
            failures += 1
            await trio.sleep(delay)

    async def _registered(self, address: PeerAddress, conn: PeerConnection) -> None:
        stream = await conn.open_control(ControlKind.RELAY, encode(Register()))
        _accepted(await read_first_untrusted(stream, Decoder()), "REGISTER")
        route = RelayRoute(conn.peer_id, address)
        self._routes[address] = (route, conn)
        logger.info("reachable through relay %s at %s", conn.peer_id.short(), address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_keepalive, conn)
            while await stream.receive_some(1024):
                raise ControlError("data on a registration stream")
            nursery.cancel_scope.cancel()

    def is_our_relay(self, conn: PeerConnection) -> bool:
        return any(registered is conn for _route, registered in self._routes.values())

    async def incoming(
        self, conn: PeerConnection, stream: Stream, first: ControlMessage, decoder: Decoder
    ) -> None:
        """A relay asks us to take a circuit: only from a relay we registered with."""
        if not isinstance(first, Incoming) or not self.is_our_relay(conn):
            await stream.send_all(encode(Refuse(RefuseCode.UNEXPECTED, "not my relay")))
            await stream.send_eof()
            return
        await stream.send_all(encode(Accept()))
        source = NodeId(first.source)
        label = f"from {source.short()} via {conn.peer_id.short()}"
        self._endpoint.open_tunnel(stream, label, decoder.take_rest())

    async def connect(self, route: RelayRoute, target: NodeId) -> PeerConnection:
        """An end-to-end connection to ``target`` through ``route``'s relay."""
        holder = object()
        relay_conn = await self._dial(route.address, route.relay, holder)
        try:
            stream = await relay_conn.open_control(ControlKind.RELAY, encode(Connect(target.raw)))
            decoder = Decoder()
            _accepted(await read_first_untrusted(stream, decoder), "CONNECT")
            label = f"to {target.short()} via {route.relay.short()}"
            tunnel = self._endpoint.open_tunnel(stream, label, decoder.take_rest())
            conn = await self._endpoint.connect_tunnel(tunnel, target)
        except BaseException:
            self._release(relay_conn, holder)
            raise
        # The relay connection is ours while the circuit lives.
        self._nursery.start_soon(self._release_after, tunnel.closed, relay_conn, holder)
        return conn

    async def _release_after(
        self, closed: trio.Event, conn: PeerConnection, holder: object
    ) -> None:
        await closed.wait()
        self._release(conn, holder)


def _accepted(answer: ControlMessage, request: str) -> None:
    if isinstance(answer, Refuse):
        raise RelayRefused(answer)
    if not isinstance(answer, Accept):
        raise ControlError(f"relay answered {request} with {type(answer).__name__}")


async def _keepalive(conn: PeerConnection) -> None:
    while not conn.is_closed:
        await trio.sleep(KEEPALIVE)
        conn.ping()
