"""``DhtFinder``: the private DHT behind the trio-facing ``Finder`` seam.

The ``kademlia`` package is asyncio code. It runs in a dedicated thread with its own asyncio
loop, and this facade is the only thing that crosses: each operation is a coroutine handed to
that loop with ``asyncio.run_coroutine_threadsafe``; the trio task sleeps on a ``trio.Event``
that the future's done-callback sets through the trio token, so trio never blocks and no trio
worker thread is held. Cancelling the trio task cancels the asyncio future (and so the task
behind it). ``serve`` owns the thread: it starts it, and on exit stops the node, cancels and
awaits every task left on the loop, closes the loop and joins the thread.

Why not trio-asyncio: measured in issue 4, every call had to be wrapped, latency was about 3x
(51 ms vs 16 ms per set at 100 nodes), and abandoned calls leaked asyncio tasks that later
crashed the trio program. A thread gives one narrow, explicit boundary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from p2pfs.address import PeerAddress
from p2pfs.discovery.dht.messages import NODE_ID_LEN, dht_key
from p2pfs.discovery.dht.node import (
    DEFAULT_ALPHA,
    DEFAULT_KSIZE,
    DEFAULT_RPC_TIMEOUT,
    DhtNode,
    Lookup,
)
from p2pfs.discovery.dht.protocol import Address, Traffic
from p2pfs.discovery.dht.ratelimit import RequestLimits
from p2pfs.discovery.dht.records import DEFAULT_MAX_TTL, RecordStore
from p2pfs.discovery.dht.shared import DHT_FIRST_BYTES, SharedPort
from p2pfs.discovery.seam import Provider
from p2pfs.errors import LocalProtocolError
from p2pfs.ids import NodeId

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TTL = DEFAULT_MAX_TTL
"""Every node caps the TTLs it stores at ``DEFAULT_MAX_TTL``, so a longer one would leave our
records gone before we re-announce them."""
REANNOUNCE_FRACTION = 2 / 3
REFRESH_INTERVAL = 900.0
JOIN_RETRY_FIRST = 5.0
JOIN_RETRY_MAX = 300.0
"""A node with bootstrap nodes but no contacts (its bootstrap names did not resolve yet, or
no bootstrap node answered: a daemon started before the network) tries again after
JOIN_RETRY_FIRST seconds, twice as long each time up to JOIN_RETRY_MAX, resolving the names
again each time; so does one that lost every contact. An announce no node took is tried
again on the same schedule."""
RESOLVE_TIMEOUT = 10.0
"""Seconds a bootstrap name may take to resolve before this join goes on without it."""
ALONE_POLL = 1.0
"""While a key's last announce reached no one and the routing table is empty, how often the
table is looked at: the first contact (a node that joined through us, or one we joined) has
the key announced at once. The first node of a private DHT shares before anyone joins it."""


@dataclass
class LookupCounters:
    """What this node's provider lookups cost, kept on the trio side (exact, not sampled):
    a benchmark or test diffs them around a lookup to learn its hops."""

    lookups: int = 0
    local: int = 0
    """Of ``lookups``: ended without a datagram sent (this node's own records answered, or
    it knew no other node)."""
    rounds: int = 0
    """Crawl rounds (hops) summed over all lookups."""
    queried: int = 0
    """Nodes the lookups asked (a truncated reply's second ask with the token not counted:
    the datagram counters in ``traffic`` see it)."""


class DhtFinder:
    """A node of the private DHT.

    ``node_id`` (our 32-byte NodeId) and ``quic_port`` are what our provider records say;
    ``shared`` is the endpoint whose socket (the node's one UDP port) the DHT shares; without
    one, ``host``/``port`` is a UDP socket of the DHT's own (0 picks a free port, see ``port``);
    ``bootstrap`` lists known nodes (none: we are the first node of our own DHT). Records we
    announce live ``ttl`` seconds (at most ``DEFAULT_MAX_TTL``) and are re-announced at 2/3 of
    it. ``limits`` bounds the requests answered per source (see ``ratelimit``).
    ``random_bytes`` makes message ids and token secrets (tests pass a seeded generator).
    """

    name = "dht"
    ends_by_silence = False

    def __init__(
        self,
        *,
        node_id: bytes,
        quic_port: int,
        host: str = "0.0.0.0",
        port: int = 0,
        bootstrap: Sequence[PeerAddress] = (),
        ttl: float = DEFAULT_TTL,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
        ksize: int = DEFAULT_KSIZE,
        alpha: int = DEFAULT_ALPHA,
        clock: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
        limits: RequestLimits | None = None,
        shared: SharedPort | None = None,
        join_retry: float = JOIN_RETRY_FIRST,
    ) -> None:
        if len(node_id) != NODE_ID_LEN:
            raise LocalProtocolError("a NodeId is 32 bytes")
        if not 1 <= quic_port <= 65535:
            raise LocalProtocolError("the QUIC port must be in [1, 65535]")
        if not 1 <= ttl <= DEFAULT_MAX_TTL:
            raise LocalProtocolError(
                f"the record TTL must be between one second and {DEFAULT_MAX_TTL:.0f}"
            )
        self.node_id = node_id
        self.quic_port = quic_port
        self.host = host
        self._requested_port = port
        self._shared = shared
        self.bootstrap_addresses = tuple(bootstrap)
        self.join_retry = join_retry
        self.ttl = ttl
        self._node = DhtNode(
            node_id=node_id,
            ksize=ksize,
            alpha=alpha,
            rpc_timeout=rpc_timeout,
            records=RecordStore(),
            clock=clock,
            random_bytes=random_bytes,
            limits=limits,
        )
        self.ksize = ksize
        self.lookups = LookupCounters()
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._accepting = False
        self._announced: dict[bytes, float] = {}
        """Discovery key -> trio time of its next announce."""
        self._unheard: dict[bytes, float] = {}
        """Announced keys whose last announce no node took -> the wait before the next try
        (doubling from join_retry), unless a first contact comes sooner."""
        self._wakeup = trio.Event()

    @property
    def port(self) -> int:
        """The DHT's bound UDP port (once ``serve`` has started)."""
        if self._port is None:
            raise LocalProtocolError("the DHT is not serving yet")
        return self._port

    @property
    def client_mode(self) -> bool:
        return bool(self._node.protocol.client_mode)

    @client_mode.setter
    def client_mode(self, on: bool) -> None:
        """Send requests as a DHT client (behind a NAT: join no one's routing table). One
        bool the DHT's thread reads per request."""
        if on != self._node.protocol.client_mode:
            logger.info("DHT %s", "client mode: behind a NAT" if on else "server mode")
        self._node.protocol.client_mode = on

    @property
    def traffic(self) -> Traffic:
        """Datagram counters (read from another thread: approximate while running)."""
        return self._node.protocol.traffic

    def contacts(self) -> int:
        """Routing table entries (length reads of the loop's lists: safe across threads)."""
        return self._node.contacts()

    async def contact_addresses(self) -> list[PeerAddress]:
        """Where the routing table's nodes are (read on the DHT's own thread, as every
        other use of the table is); none while the DHT does not serve."""
        if not self._accepting or self._loop is None:
            return []

        async def read(node: DhtNode) -> list[PeerAddress]:
            return [
                PeerAddress(_unmapped(contact.ip), contact.port)
                for bucket in node.protocol.router.buckets
                for contact in bucket.nodes.values()
            ]

        return await self._call(read)

    def records(self) -> int:
        """Provider records this node holds for others (a length read: safe across threads)."""
        return len(self._node.protocol.records)

    # ---- lifecycle ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._loop is not None:
            raise LocalProtocolError("DhtFinder.serve runs once")
        bootstrap = await self._resolve(self.bootstrap_addresses)
        token = trio.lowlevel.current_trio_token()
        ready = trio.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop
        thread = threading.Thread(
            target=self._thread_main, args=(loop, token, ready), name="p2pfs-dht", daemon=True
        )
        thread.start()
        try:
            await ready.wait()
            self._accepting = True
            await self._open_socket()
            if bootstrap:
                contacts = await self._call(lambda node: node.bootstrap(bootstrap))
                logger.info("DHT bootstrapped: %d contacts", contacts)
            task_status.started()
            await self._maintain(joined=not self.bootstrap_addresses or self.contacts() > 0)
        finally:
            if self._shared is not None:
                # From trio, as routing is: no datagram is handed to the loop after this.
                self._shared.set_datagram_handler(DHT_FIRST_BYTES, None)
            self._accepting = False
            stop = self._stop
            if stop is not None:
                loop.call_soon_threadsafe(stop.set)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)

    async def _open_socket(self) -> None:
        shared = self._shared
        if shared is None:
            _, self._port = await self._call(
                lambda node: node.listen(self.host, self._requested_port)
            )
            logger.info("DHT listening on UDP %s:%d", self.host, self._port)
            return
        transport = await self._call(lambda node: node.attach(shared))
        shared.set_datagram_handler(DHT_FIRST_BYTES, transport.deliver)
        self._port = shared.local_address[1]
        logger.info("DHT sharing the node's UDP port %d", self._port)

    def _thread_main(
        self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken, ready: trio.Event
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._loop_main(token, ready))
            loop.run_until_complete(_drain_tasks())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    async def _loop_main(self, token: trio.lowlevel.TrioToken, ready: trio.Event) -> None:
        self._stop = asyncio.Event()
        _wake(token, ready)
        try:
            await self._stop.wait()
        finally:
            self._node.close()

    async def _join(self) -> bool:
        """Resolve the bootstrap nodes again and join through them if still alone; whether
        the routing table holds anyone now."""
        bootstrap = await self._resolve(self.bootstrap_addresses)
        contacts = await self._call(lambda node: node.rejoin(bootstrap))
        if contacts:
            logger.info("DHT joined: %d contacts", contacts)
        else:
            logger.info("DHT: no bootstrap node answered yet; trying again later")
        return contacts > 0

    async def _resolve(self, addresses: Sequence[PeerAddress]) -> list[Address]:
        """Each address with its host name resolved now (a name that does not resolve is
        left out, with a warning; it is tried again at the next join), in an address
        family our socket speaks (either, on the node's dual-stack port)."""
        if self._shared is not None:
            families = self._shared.families
        else:
            families = frozenset((socket.AF_INET6 if ":" in self.host else socket.AF_INET,))
        family = next(iter(families)) if len(families) == 1 else socket.AF_UNSPEC
        resolved: list[Address] = []
        for address in addresses:
            try:
                # Bounded: the announces wait while this runs (a resolver that does not
                # answer took 5 s per server and attempt).
                with trio.fail_after(RESOLVE_TIMEOUT):
                    infos = await trio.socket.getaddrinfo(
                        address.host, address.port, family=family, type=socket.SOCK_DGRAM
                    )
            except (OSError, trio.TooSlowError) as exc:
                logger.warning("DHT bootstrap %s does not resolve: %s", address, exc or "timed out")
                continue
            spoken = [
                (_unmapped(str(info[4][0])), int(info[4][1]))
                for info in infos
                if info[0] in families
            ]
            if not spoken:
                logger.warning("DHT bootstrap %s: no address of a family we speak", address)
                continue
            # Every address a name has, both families: the node there may run its DHT on
            # one of them only (an older node, or one on IPv4 alone).
            resolved.extend(a for a in dict.fromkeys(spoken) if a not in resolved)
        return resolved

    async def _call(self, make: Callable[[DhtNode], Coroutine[Any, Any, T]]) -> T:
        """Run ``make(node)`` on the DHT loop; cancelling the caller cancels it there."""
        if not self._accepting or self._loop is None:
            raise LocalProtocolError("the DHT is not serving")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = asyncio.run_coroutine_threadsafe(make(self._node), self._loop)
        future.add_done_callback(lambda _: _wake(token, done))
        try:
            await done.wait()
        finally:
            if not future.done():
                future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise LocalProtocolError("the DHT stopped during the call") from None

    async def _maintain(self, *, joined: bool) -> None:
        """Re-announce each key at 2/3 of the TTL; refresh idle buckets; join again (with
        backoff) while alone; wait on deadlines."""
        now = trio.current_time()
        next_refresh = now + REFRESH_INTERVAL
        join_wait = self.join_retry
        next_join = math.inf if joined else now + join_wait
        was_alone = self.contacts() == 0
        while True:
            now = trio.current_time()
            alone = self.contacts() == 0
            if now >= next_join:
                if await self._join():
                    join_wait, next_join = self.join_retry, math.inf
                    alone = False
                else:
                    join_wait = min(2 * join_wait, JOIN_RETRY_MAX)
                    next_join = now + join_wait
            if was_alone and not alone:
                # Joined, or a first node joined us: what reached no one goes out now.
                for key in self._unheard.keys() & self._announced.keys():
                    self._announced[key] = now
            was_alone = alone
            for key, due in list(self._announced.items()):
                if due <= now and key in self._announced:
                    if alone and key in self._unheard:
                        # No one to tell (and each try would ping the bootstrap nodes
                        # again): a join or a first contact announces it.
                        self._announced[key] = now + self._unheard[key]
                        continue
                    self._announced[key] = now + self.ttl * REANNOUNCE_FRACTION
                    await self._announce_once(key)
            if now >= next_refresh:
                next_refresh = now + REFRESH_INTERVAL
                await self._call(lambda node: node.refresh())
                if self.bootstrap_addresses and self.contacts() == 0:
                    next_join = min(next_join, now)  # lost every contact: join again
            deadline = min([next_refresh, next_join, *self._announced.values()])
            if self._unheard and alone:
                deadline = min(deadline, now + ALONE_POLL)
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    # ---- the Finder seam ------------------------------------------------------------------

    async def _announce_once(self, key: bytes) -> int:
        ttl = math.ceil(self.ttl)
        accepted = await self._call(
            lambda node: node.announce(dht_key(key), self.node_id, self.quic_port, ttl)
        )
        logger.debug("announced %s to %d nodes", key.hex()[:12], accepted)
        if accepted:
            self._unheard.pop(key, None)
        elif key in self._announced:
            wait = (
                min(2 * self._unheard[key], JOIN_RETRY_MAX)
                if key in self._unheard
                else self.join_retry
            )
            self._unheard[key] = wait
            self._announced[key] = trio.current_time() + wait
            self._wakeup.set()  # the maintaining loop's deadline moved
        return accepted

    async def announce(self, key: bytes) -> None:
        self._announced[key] = trio.current_time() + self.ttl * REANNOUNCE_FRACTION
        self._wakeup.set()
        await self._announce_once(key)

    def addresses_changed(self) -> None:
        """Every key announced again now: a record's address is the one its storer saw the
        announce come from, so the records made before name the old one (for up to 2/3 of
        the TTL, 20 min, before the next re-announce)."""
        now = trio.current_time()
        self._announced = dict.fromkeys(self._announced, now)
        self._wakeup.set()

    async def withdraw(self, key: bytes) -> None:
        self._announced.pop(key, None)
        self._unheard.pop(key, None)
        self._wakeup.set()
        await trio.lowlevel.checkpoint()

    async def find(self, key: bytes, limit: int = 16) -> Sequence[Provider]:
        """Providers of ``key`` other than this node (its own records are left out)."""
        lookup = await self.lookup(key, limit)
        return [
            Provider(PeerAddress(p.ip, p.port), NodeId(p.node_id), self.name)
            for p in lookup.providers
        ]

    async def lookup(self, key: bytes, limit: int = 16) -> Lookup:
        """``find`` with the lookup's statistics (rounds, nodes queried)."""
        lookup = await self._call(
            lambda node: node.find_providers(dht_key(key), limit, asker=self.node_id)
        )
        self.lookups.lookups += 1
        self.lookups.local += int(lookup.queried == 0)
        self.lookups.rounds += lookup.rounds
        self.lookups.queried += lookup.queried
        return lookup

    async def ping(self, address: PeerAddress) -> bool:
        """One DHT round trip to ``address`` (an IP literal); True if it answered."""
        target = (address.host, address.port)
        ok, _ = await self._call(lambda node: node.protocol.call_ping_address(target))
        return bool(ok)


def _wake(token: trio.lowlevel.TrioToken, event: trio.Event) -> None:
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(event.set)


async def _drain_tasks() -> None:
    """Cancel and await every task left on the loop, including ones they start meanwhile."""
    current = asyncio.current_task()
    while tasks := [task for task in asyncio.all_tasks() if task is not current]:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 one it is: the node's port reports IPv4
    peers so (net/endpoint.py), and a reply must match the request's address."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return host
