"""Discovery over a sequence of Finders, and the fetch's dialing policy above it, in one
process: real QUIC endpoints on loopback, the in-memory finder as the discovery backend
(no daemons). What is pinned: who is dialed, in which order, with which NodeId expected."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from p2pfs.address import PeerAddress
from p2pfs.daemon.dialer import Dialer, DialError
from p2pfs.daemon.discovery import (
    Discovery,
    DiscoveryConfig,
    PortInUseError,
    dht_required,
)
from p2pfs.daemon.fetches import Fetches
from p2pfs.daemon.storage import AsyncIndex
from p2pfs.daemon.streams import TransferCounters
from p2pfs.daemon.swarmstate import SwarmRegistry
from p2pfs.discovery.dht.finder import DhtFinder
from p2pfs.discovery.keys import share_discovery_key
from p2pfs.discovery.seam import Finder, MemoryDirectory, MemoryFinder, Provider
from p2pfs.identity import Identity
from p2pfs.ids import ContentHash, NodeId
from p2pfs.net import Endpoint, PeerConnection, open_endpoint
from p2pfs.store.index import IndexStore
from p2pfs.wire.ticket import Ticket, TicketKind

ROOT = ContentHash(bytes(range(32)))
KEY = share_discovery_key(ROOT)


async def serve_forever(conn: PeerConnection) -> None:
    await conn.wait_closed()


def address_of(endpoint: Endpoint) -> PeerAddress:
    host, port = endpoint.local_address
    return PeerAddress(host, port)


class Net:
    """Three nodes on loopback (``holder``, ``other``, and ``me`` who fetches), one shared
    in-memory discovery directory, and ``me``'s fetch machinery over it."""

    def __init__(
        self,
        holders: tuple[Endpoint, Endpoint, Endpoint],
        directory: MemoryDirectory,
        discovery: Discovery,
        fetches: Fetches,
    ) -> None:
        self.holder, self.other, self.me = holders
        self.directory = directory
        self.discovery = discovery
        self.fetches = fetches

    async def publish(self, address: PeerAddress, node: NodeId | None, source: str) -> None:
        """A record in the directory, as a backend would return it."""
        await MemoryFinder(self.directory, Provider(address, node, source)).announce(KEY)

    async def connect(
        self, ticket: Ticket, *, give_up: float = 3.0, exclude: set[NodeId] | None = None
    ) -> PeerConnection:
        connect = self.fetches.holder_connector(ticket, [], object(), give_up)
        return await connect(exclude or set())


def run(tmp_path: Path, body: Callable[[Net], Awaitable[None]]) -> None:
    ids = [Identity.generate() for _ in range(3)]
    directory = MemoryDirectory()

    async def main() -> None:
        with trio.fail_after(60), IndexStore(tmp_path / "index.db") as store:
            async with (
                open_endpoint(ids[0], handler=serve_forever) as holder,
                open_endpoint(ids[1], handler=serve_forever) as other,
                open_endpoint(ids[2], handler=serve_forever) as me,
                trio.open_nursery() as nursery,
            ):
                mine = MemoryFinder(directory, Provider(address_of(me), me.node_id, "memory"))
                discovery = Discovery([mine])
                await nursery.start(discovery.serve)
                dialer = Dialer(me, serve_forever, nursery, stagger=0.05, timeout=1.0)
                fetches = Fetches(
                    dialer,
                    discovery,
                    AsyncIndex(store),
                    TransferCounters(),
                    SwarmRegistry(),
                    None,
                    (),
                )
                await body(Net((holder, other, me), directory, discovery, fetches))
                nursery.cancel_scope.cancel()

    trio.run(main)


def bare_ticket(node: NodeId | None = None, *addresses: PeerAddress) -> Ticket:
    return Ticket(TicketKind.SHARE, ROOT, node, addresses)


def test_a_holder_only_discovery_knows_is_reached_with_its_key_pinned(tmp_path: Path) -> None:
    async def body(net: Net) -> None:
        await net.publish(address_of(net.holder), net.holder.node_id, "memory")
        conn = await net.connect(bare_ticket())
        assert conn.peer_id == net.holder.node_id

    run(tmp_path, body)


def test_a_record_naming_a_node_at_another_nodes_address_is_refused(tmp_path: Path) -> None:
    """Discovery's word is checked by the handshake: the record says "holder" but the node
    at that address proves another key, so the fetch does not take it for the holder."""

    async def body(net: Net) -> None:
        await net.publish(address_of(net.other), net.holder.node_id, "memory")
        with pytest.raises(DialError) as caught:
            await net.connect(bare_ticket(), give_up=0.3)
        reasons = [why for candidate, why in caught.value.attempts]
        assert reasons and all("not the node expected" in why for why in reasons)
        assert {c.address for c, _ in caught.value.attempts} == {address_of(net.other)}

    run(tmp_path, body)


def test_a_pinned_record_is_not_downgraded_by_an_address_only_one(tmp_path: Path) -> None:
    """Two backends name one address, one with a NodeId (the DHT, LAN) and one without
    (Mainline): the merge keeps the pin, so a wrong node there stays refused."""

    async def body(net: Net) -> None:
        wrong = address_of(net.other)
        for first, then in ((None, net.holder.node_id), (net.holder.node_id, None)):
            net.directory.records.clear()
            await net.publish(wrong, first, "one backend")
            await net.publish(wrong, then, "another")
            found = await net.discovery.find(ROOT)
            assert [(p.address, p.node_id) for p in found] == [(wrong, net.holder.node_id)]
        with pytest.raises(DialError):
            await net.connect(bare_ticket(), give_up=0.3)

    run(tmp_path, body)


def test_an_address_only_record_reaches_whoever_answers_there(tmp_path: Path) -> None:
    """Mainline gives no NodeId: any node at the address will do (the content's hashes are
    the check), but never this node itself."""

    async def body(net: Net) -> None:
        await net.publish(address_of(net.me), None, "mainline")
        await net.publish(address_of(net.other), None, "mainline")
        conn = await net.connect(bare_ticket())
        assert conn.peer_id == net.other.node_id

    run(tmp_path, body)


def test_ticket_addresses_come_first_and_discovery_serves_the_excluded(tmp_path: Path) -> None:
    async def body(net: Net) -> None:
        await net.publish(address_of(net.other), net.other.node_id, "memory")
        ticket = bare_ticket(net.holder.node_id, address_of(net.holder))
        first = await net.connect(ticket)
        assert first.peer_id == net.holder.node_id
        # The ticket's node is excluded (a fetch already uses it): discovery's is next.
        second = await net.connect(ticket, exclude={net.holder.node_id})
        assert second.peer_id == net.other.node_id

    run(tmp_path, body)


def test_a_holder_announced_later_is_found_by_asking_again(tmp_path: Path) -> None:
    async def body(net: Net) -> None:
        async def announce_later() -> None:
            await trio.sleep(0.3)
            await net.publish(address_of(net.holder), net.holder.node_id, "memory")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(announce_later)
            conn = await net.connect(bare_ticket(), give_up=10)
        assert conn.peer_id == net.holder.node_id

    run(tmp_path, body)


def test_nobody_anywhere_ends_with_one_clear_error(tmp_path: Path) -> None:
    async def body(net: Net) -> None:
        with pytest.raises(DialError, match=r"names no address and discovery found no provider"):
            await net.connect(bare_ticket(), give_up=0.2)
        # The ticket's only node already tried and passed over: the error says so.
        ticket = bare_ticket(net.holder.node_id, address_of(net.holder))
        with pytest.raises(DialError, match=r"names no other holder and discovery found no"):
            await net.connect(ticket, exclude={net.holder.node_id}, give_up=0.2)

    run(tmp_path, body)


# -- which backends run ----------------------------------------------------------------------


def taken_udp_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def dht_on(port: int) -> DhtFinder:
    return DhtFinder(node_id=bytes(32), quic_port=1, host="127.0.0.1", port=port)


def test_a_required_backend_that_cannot_start_ends_discovery_naming_its_flag() -> None:
    with taken_udp_port() as sock:
        port = sock.getsockname()[1]
        dht = dht_on(port)
        config = DiscoveryConfig(dht_host="127.0.0.1", dht_port=port)
        discovery = Discovery([dht], required={dht: dht_required(config)})

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(discovery.serve)

        with pytest.raises(BaseExceptionGroup) as caught:
            trio.run(main)
        error = caught.value.split(PortInUseError)[0]
        assert error is not None
        (leaf,) = _leaves(error)
        assert f"127.0.0.1:{port}" in str(leaf)
        assert "--dht-port" in str(leaf)


def test_an_optional_backend_that_cannot_start_is_skipped_and_the_rest_serve() -> None:
    directory = MemoryDirectory()
    theirs = Provider(PeerAddress("192.0.2.7", 7337), NodeId(bytes([7]) * 32), "memory")

    async def main() -> None:
        with taken_udp_port() as sock:
            broken = dht_on(sock.getsockname()[1])
            mine = MemoryFinder(directory, Provider(PeerAddress("192.0.2.1", 7337), None))
            finders: list[Finder] = [broken, mine]
            discovery = Discovery(finders, required={})
            async with trio.open_nursery() as nursery:
                await nursery.start(discovery.serve)
                assert discovery.backends == ["memory"]
                await MemoryFinder(directory, theirs).announce(KEY)
                assert await discovery.find(ROOT) == [theirs]
                await discovery.announce(ROOT)
                assert list(directory.records[KEY]) == [theirs, mine.me]
                nursery.cancel_scope.cancel()

    trio.run(main)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves
