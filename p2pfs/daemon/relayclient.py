"""Home relays: staying reachable through relays, found with or without configuration
(SPEC "Relays and hole punching").

A node keeps registrations with up to ``HOME_RELAYS`` relays (iroh's home relay, Syncthing's
relay pool), so that nodes which cannot dial it directly reach it through one:
- every ``--relay-via`` relay, always, retried for as long as the node runs;
- otherwise relays it finds itself: its ``--peer`` and ``--bootstrap`` nodes (one that
  answers REGISTER with NOT_A_RELAY is remembered as none for an hour), then relays that
  announce themselves in the private DHT under the relays key. A found relay that fails
  ``GIVE_UP_AFTER`` times in a row is dropped for the next one found.
Registered relays are named in the node's tickets and ``id``; each relay announces, under a
key derived from the node's NodeId, that it relays for the node, so a peer holding only the
NodeId (a folder member, a ticket made before the registration) finds the way in too
(``Dialer`` asks when every direct address fails). INCOMING is taken only from a relay we
registered with, and connections to others are dialled through a relay named for them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from p2pfs.address import PeerAddress
from p2pfs.errors import CONNECTION_FAILURES, first_leaf
from p2pfs.ids import NodeId
from p2pfs.net import Endpoint, PeerConnection, Stream
from p2pfs.net.connection import Address
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

from .relay import RelayRefused, read_first_untrusted

logger = logging.getLogger(__name__)

HOME_RELAYS = 2
"""Relays a node keeps registrations with when it finds them itself: two, so that losing
one leaves the node reachable while another is found."""
KEEPALIVE = 10.0
"""Ping the relay this often: keeps the connection and every NAT's mapping on the way alive
(Linux conntrack forgets an idle UDP flow after 30 s, many home routers sooner)."""
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
GIVE_UP_AFTER = 3
"""Failures in a row after which a relay the node found itself is given up."""
SEARCH_INTERVALS = (0.0, 2.0, 5.0, 10.0, 30.0)
"""When to look for relays while short of HOME_RELAYS: soon after start (the DHT may still be
joining), then every 30 s."""
NOT_A_RELAY_FOR = 3600.0


@dataclass(frozen=True, slots=True)
class RelayRoute:
    relay: NodeId
    address: PeerAddress


DialRelay = Callable[[PeerAddress, NodeId | None, object], Awaitable[PeerConnection]]
Release = Callable[[PeerConnection, object], None]
FindRelays = Callable[[], Awaitable[list[tuple[PeerAddress, NodeId | None]]]]
"""Relays worth trying, best first: (address, NodeId if known)."""


class RelayClient:
    """The registered side, and the dialling side of circuits."""

    def __init__(
        self,
        endpoint: Endpoint,
        relays: tuple[PeerAddress, ...],
        dial: DialRelay,
        release: Release,
        nursery: trio.Nursery,
        *,
        find_relays: FindRelays | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._nursery = nursery
        self._explicit = relays
        self._dial = dial
        self._release = release
        self._find_relays = find_relays
        self._routes: dict[PeerAddress, tuple[RelayRoute, PeerConnection]] = {}
        self._keepers: set[PeerAddress] = set()
        """Relays with a registration task running (registered, or trying to)."""
        self._not_relays: dict[PeerAddress, float] = {}
        """Nodes that said they do not relay, until when to believe them."""
        self.changed = trio.Event()
        """Set (and replaced) whenever a registration starts or ends."""

    @property
    def routes(self) -> list[RelayRoute]:
        """The relays this node is registered with now (for tickets and ``id``)."""
        return [route for route, _conn in self._routes.values()]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for address in self._explicit:
                self._keepers.add(address)
                nursery.start_soon(self._keep_registered, address, None, False)
            task_status.started()
            if self._find_relays is not None and not self._explicit:
                await self._search(nursery)

    async def _search(self, nursery: trio.Nursery) -> None:
        assert self._find_relays is not None
        for round_number in itertools.count():
            delay = SEARCH_INTERVALS[min(round_number, len(SEARCH_INTERVALS) - 1)]
            await trio.sleep(delay)
            if len(self._keepers) >= HOME_RELAYS:
                continue
            now = trio.current_time()
            for address, node in await self._find_relays():
                if len(self._keepers) >= HOME_RELAYS:
                    break
                if address in self._keepers or self._not_relays.get(address, 0.0) > now:
                    continue
                self._keepers.add(address)
                nursery.start_soon(self._keep_registered, address, node, True)

    async def _keep_registered(
        self, address: PeerAddress, node: NodeId | None, found: bool
    ) -> None:
        failures = 0
        try:
            while not found or failures < GIVE_UP_AFTER:
                holder = object()
                refused: RelayRefused | None = None
                # A registration ends inside its nursery, so its errors come in a group:
                # a plain except missed them, and a relay that restarted ended the daemons
                # of every home registered with it.
                try:
                    conn = await self._dial(address, node, holder)
                    try:
                        await self._registered(address, conn)
                        failures = 0
                    finally:
                        self._routes.pop(address, None)
                        self._changed()
                        self._release(conn, holder)
                except* RelayRefused as group:
                    refused = first_leaf(group)
                except* CONNECTION_FAILURES as group:
                    logger.info("relay %s unreachable or lost: %s", address, first_leaf(group))
                if refused is not None:
                    if found and refused.code is RefuseCode.NOT_A_RELAY:
                        logger.debug("%s is not a relay", address)
                        self._not_relays[address] = trio.current_time() + NOT_A_RELAY_FOR
                        return
                    logger.warning("relay %s: %s", address, refused)
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                await trio.sleep(delay)
            logger.info("relay %s: given up after %d failures", address, failures)
        finally:
            self._keepers.discard(address)

    async def _registered(self, address: PeerAddress, conn: PeerConnection) -> None:
        stream = await conn.open_control(ControlKind.RELAY, encode(Register()))
        accepted(await read_first_untrusted(stream, Decoder()), "REGISTER")
        route = RelayRoute(conn.peer_id, address)
        self._routes[address] = (route, conn)
        self._changed()
        logger.info("reachable through relay %s at %s", conn.peer_id.short(), address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_keepalive, conn)
            while await stream.receive_some(1024):
                raise ControlError("data on a registration stream")
            nursery.cancel_scope.cancel()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

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
        source = NodeId(first.source)
        label = f"from {source.short()} via {conn.peer_id.short()}"
        self._endpoint.open_tunnel(stream, first.circuit, _address_of(conn), label)
        await stream.send_all(encode(Accept()))

    async def connect(self, route: RelayRoute, target: NodeId) -> PeerConnection:
        """An end-to-end connection to ``target`` through ``route``'s relay."""
        holder = object()
        relay_conn = await self._dial(route.address, route.relay, holder)
        try:
            stream = await relay_conn.open_control(ControlKind.RELAY, encode(Connect(target.raw)))
            accept = accepted(await read_first_untrusted(stream, Decoder()), "CONNECT")
            label = f"to {target.short()} via {route.relay.short()}"
            tunnel = self._endpoint.open_tunnel(
                stream, accept.circuit, _address_of(relay_conn), label
            )
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


def accepted(answer: ControlMessage, request: str) -> Accept:
    """The relay's ACCEPT of ``request``; RelayRefused or ControlError otherwise."""
    if isinstance(answer, Refuse):
        raise RelayRefused(answer)
    if not isinstance(answer, Accept):
        raise ControlError(f"relay answered {request} with {type(answer).__name__}")
    if request == "CONNECT" and not answer.circuit:
        raise ControlError("the relay accepted CONNECT without a circuit id")
    return answer


def _address_of(conn: PeerConnection) -> Callable[[], Address]:
    """The relay's address as ``conn`` sees it at each call."""
    return lambda: conn.remote_address


async def _keepalive(conn: PeerConnection) -> None:
    while not conn.is_closed:
        await trio.sleep(KEEPALIVE)
        conn.ping()
