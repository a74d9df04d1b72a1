"""One DHT node on an asyncio loop: the package's routing and crawls plus provider lookups.

``DhtNode`` is what runs inside the DHT thread (``finder.py``) and, unchanged, inside the
simulation (``simulations/dht``) over an in-memory transport. It owns a ``DhtProtocol`` and
offers the four operations the facade needs: bootstrap, announce, find providers, refresh.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kademlia.crawling import NodeSpiderCrawl  # type: ignore[import-untyped]
from kademlia.node import Node  # type: ignore[import-untyped]

from p2pfs.discovery.dht.crawl import ProviderCrawl
from p2pfs.discovery.dht.messages import ID_LEN, ProviderInfo, dht_node_id
from p2pfs.discovery.dht.protocol import Address, DhtProtocol
from p2pfs.discovery.dht.ratelimit import RequestLimits
from p2pfs.discovery.dht.records import RecordStore
from p2pfs.discovery.dht.shared import SharedPort, SharedSocketTransport

logger = logging.getLogger(__name__)

DEFAULT_KSIZE = 20
DEFAULT_ALPHA = 3
DEFAULT_RPC_TIMEOUT = 2.0
SEED_FACTOR = 3
"""A crawl starts from this many times k of our contacts nearest the target. Only the k
nearest are asked first; the rest stand behind them, so a crawl whose nearest seeds all time
out (nodes gone since we last heard from them) goes on from our next-nearest contacts instead
of ending with nothing."""


@dataclass(frozen=True, slots=True)
class Lookup:
    providers: tuple[ProviderInfo, ...]
    rounds: int
    """The lookup's hops: the depth of the answer that named the providers (1 = one of our own
    contacts); 0 when answered from this node's own records."""
    queried: int


class DhtNode:
    def __init__(
        self,
        *,
        node_id: bytes,
        ksize: int = DEFAULT_KSIZE,
        alpha: int = DEFAULT_ALPHA,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
        records: RecordStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
        limits: RequestLimits | None = None,
    ) -> None:
        self.node = Node(dht_node_id(node_id))
        self.ksize = ksize
        self.alpha = alpha
        self.protocol = DhtProtocol(
            self.node,
            ksize=ksize,
            rpc_timeout=rpc_timeout,
            records=records or RecordStore(),
            clock=clock,
            random_bytes=random_bytes,
            limits=limits,
        )
        self.transport: asyncio.DatagramTransport | None = None
        self.bootstrap_addresses: list[Address] = []

    async def listen(self, host: str, port: int) -> Address:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self.protocol, local_addr=(host, port)
        )
        self.transport = transport
        sockname = transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    async def attach(self, port: SharedPort) -> SharedSocketTransport:
        """Use ``port``'s socket (the node's one UDP port) instead of a socket of our own;
        the caller routes the port's DHT datagrams to the returned transport's ``deliver``."""
        transport = SharedSocketTransport(port, self.protocol, asyncio.get_running_loop())
        self.transport = transport
        return transport

    def close(self) -> None:
        self.protocol.cancel_calls()
        if self.transport is not None:
            self.transport.close()

    def contacts(self) -> int:
        return sum(len(bucket) for bucket in self.protocol.router.buckets)

    async def bootstrap(self, addresses: Sequence[Address]) -> int:
        """Ping the given addresses, then look ourselves up through those that answered;
        returns how many nodes the routing table holds afterwards."""
        self.bootstrap_addresses = list(addresses)
        replies = await asyncio.gather(
            *(self.protocol.call_ping_address(address) for address in addresses)
        )
        seeds = [
            Node(reply, *address)
            for address, (ok, reply) in zip(addresses, replies, strict=True)
            if ok and reply != self.node.id
        ]
        for seed in seeds:
            self.protocol.welcome_if_new(seed)
        if seeds:
            crawl = NodeSpiderCrawl(self.protocol, self.node, seeds, self.ksize, self.alpha)
            await crawl.find()
        return self.contacts()

    async def rejoin(self, addresses: Sequence[Address]) -> int:
        """``bootstrap`` through ``addresses`` (resolved again by the caller) if the routing
        table is empty; remembered for the next rejoin either way. How many nodes it holds."""
        if addresses:
            self.bootstrap_addresses = list(addresses)
        if self.contacts() == 0 and self.bootstrap_addresses:
            return await self.bootstrap(self.bootstrap_addresses)
        return self.contacts()

    async def _rejoin_if_alone(self) -> None:
        if self.contacts() == 0 and self.bootstrap_addresses:
            await self.bootstrap(self.bootstrap_addresses)

    async def announce(self, key: bytes, provider_id: bytes, port: int, ttl: int) -> int:
        """Store our provider record on the k nodes nearest ``key``; returns how many took it."""
        assert len(key) == ID_LEN
        await self._rejoin_if_alone()
        target = Node(key)
        nearest = self._crawl_seeds(target)
        if not nearest:
            logger.info("announce %s: no known DHT nodes", key.hex()[:12])
            return 0
        crawl = ProviderCrawl(
            self.protocol, target, nearest, self.ksize, self.alpha, stop_on_found=False
        )
        await crawl.find()
        holders = crawl.closest_with_tokens()[: self.ksize]
        results = await asyncio.gather(
            *(
                self.protocol.call_add_provider(node, key, token, provider_id, port, ttl)
                for node, token in holders
            )
        )
        accepted = sum(1 for ok, took in results if ok and took)
        logger.debug("announce %s: %d of %d accepted", key.hex()[:12], accepted, len(holders))
        return accepted

    def _crawl_seeds(self, target: Node) -> list[Node]:
        found: list[Node] = self.protocol.router.find_neighbors(target, self.ksize * SEED_FACTOR)
        return found

    async def find_providers(self, key: bytes, limit: int, *, asker: bytes | None = None) -> Lookup:
        """Providers of ``key``; records naming ``asker`` (our own provider id: we provide
        the key too) are left out, so they neither answer nor end the lookup."""
        assert len(key) == ID_LEN
        own = [
            record
            for record in self.protocol.records.get(key, self.protocol.clock(), limit + 1)
            if record.node_id != asker
        ][:limit]
        if own:
            now = self.protocol.clock()
            infos = tuple(
                ProviderInfo(r.node_id, r.ip, r.port, max(0, int(r.expires - now))) for r in own
            )
            return Lookup(infos, 0, 0)
        await self._rejoin_if_alone()
        target = Node(key)
        nearest = self._crawl_seeds(target)
        if not nearest:
            return Lookup((), 0, 0)
        crawl = ProviderCrawl(
            self.protocol, target, nearest, self.ksize, self.alpha, stop_on_found=True, asker=asker
        )
        await crawl.find()
        return Lookup(tuple(crawl.providers.values())[:limit], crawl.rounds, crawl.queried)

    async def refresh(self) -> None:
        """The package's bucket refresh: look up a random id in every bucket idle for an hour."""
        await self._rejoin_if_alone()
        crawls = []
        for node_id in self.protocol.get_refresh_ids():
            target = Node(node_id)
            nearest = self.protocol.router.find_neighbors(target, self.ksize)
            crawls.append(
                NodeSpiderCrawl(self.protocol, target, nearest, self.ksize, self.alpha).find()
            )
        await asyncio.gather(*crawls)
