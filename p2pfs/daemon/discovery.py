"""The daemon's discovery: builds the configured backends, and runs any sequence of
``Finder`` backends (``p2pfs.discovery.seam``), announcing to all and merging lookups."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from p2pfs.address import PeerAddress
from p2pfs.api.metrics import Histogram
from p2pfs.discovery.dht.finder import DhtFinder
from p2pfs.discovery.dht.messages import MAX_CONTACTS
from p2pfs.discovery.dht.node import DEFAULT_KSIZE
from p2pfs.discovery.dht.shared import SharedPort
from p2pfs.discovery.keys import share_discovery_key
from p2pfs.discovery.lan import LAN_PORT, LanFinder
from p2pfs.discovery.seam import Finder, Provider
from p2pfs.errors import LocalProtocolError, P2pfsError
from p2pfs.ids import ContentHash, NodeId
from p2pfs.net.endpoint import is_ipv6_wildcard

logger = logging.getLogger(__name__)

FIND_TIMEOUT = 15.0
"""Longest a fetch waits on discovery before giving up on the backends still searching."""
FIND_GRACE = 0.25
"""Once the backends that end their own search have answered and providers are known, how
much longer one that ends only by silence may take: the LAN's query waited its whole 1 s
whenever no one on the link held the key, in every hint-less fetch, join and re-discovery
round (a holder that answers the query does so in milliseconds)."""

DHT_K_ENV = "P2PFS_DHT_K"
"""The private DHT's k (replication and bucket size) when ``DiscoveryConfig.dht_ksize`` is
not set. Not a command-line flag: k is a property of the whole network, which every node
should share, so no user should tune it. Tests and ``bench dht`` set it to run a few dozen
loopback daemons with a k small enough that a record lives on a few of them, as it would on
a few of many thousands: with the default k=20 in a 20-node DHT every node holds every
record and no lookup crosses the network. (Like ``P2PFS_QUIC_ENGINE``, it reaches daemons
that tests start in their own processes without a flag in the shipped CLI.)"""


class PortInUseError(LocalProtocolError):
    """A port this node needs is taken; the message names the flag that picks another."""

    def __init__(self, what: str, address: str, flag: str) -> None:
        super().__init__(
            f"the {what} port {address} is already in use (another p2pfs daemon or program); "
            f"choose another with {flag}"
        )


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    dht_host: str = "0.0.0.0"
    dht_port: int | None = None
    """None: the DHT shares the node's one UDP port (the QUIC endpoint's socket); a number:
    a socket of its own on that port (0: any free one), the ``--dht-port`` opt-out."""
    bootstrap: tuple[PeerAddress, ...] = ()
    mainline: bool = False
    mainline_port: int = 0
    lan: bool = True
    lan_port: int = LAN_PORT
    dht_ksize: int | None = None
    """None: ``$P2PFS_DHT_K`` if set, else the DHT's default (20)."""


@dataclass(frozen=True, slots=True)
class Required:
    """A backend the node cannot run without: its failure to start ends the daemon rather
    than fall back silently. ``what``, ``address`` and ``flag`` name it when its port is
    taken."""

    what: str
    address: str
    flag: str


def configured_finders(
    config: DiscoveryConfig, node_id: NodeId, quic_port: int, shared: SharedPort
) -> tuple[DhtFinder, list[Finder]]:
    """The backends ``config`` enables, the private DHT first (and also returned alone: the
    node reports its counters). ``shared``: the endpoint that owns the node's UDP port, for
    the DHT to share unless ``config.dht_port`` asks for a socket of its own."""
    dht = DhtFinder(
        node_id=node_id.raw,
        quic_port=quic_port,
        host=own_dht_host(config.dht_host) if config.dht_port is not None else config.dht_host,
        port=config.dht_port or 0,
        bootstrap=config.bootstrap,
        ksize=dht_ksize(config, os.environ),
        shared=shared if config.dht_port is None else None,
    )
    finders: list[Finder] = [dht]
    if config.mainline:
        # libtorrent costs ~9 MiB resident once imported: only a node that asks pays it.
        from p2pfs.discovery.mainline import MainlineFinder  # noqa: PLC0415

        finders.append(MainlineFinder(quic_port, listen_port=config.mainline_port))
    if config.lan and _is_wildcard(config.dht_host):
        finders.append(LanFinder(node_id.raw, quic_port, port=config.lan_port))
    elif config.lan:
        # A beacon's provider address is its datagram's source IP (never one from the
        # payload); a node bound to one address may not answer there, so it stays quiet
        # rather than advertise an address that cannot reach it.
        logger.info("LAN discovery off: it needs the node bound to a wildcard address")
    return dht, finders


def own_dht_host(listen_host: str) -> str:
    """Where a DHT on a socket of its own (``--dht-port``) binds: the node's host, but
    IPv4's wildcard for the dual-stack one (``::``): that socket is asyncio's, which would
    see IPv4 peers as mapped addresses it cannot send to; only the node's own endpoint
    translates them (SPEC "Both address families")."""
    return "0.0.0.0" if is_ipv6_wildcard(listen_host) else listen_host


def dht_required(config: DiscoveryConfig) -> Required:
    """The private DHT is how --no-hints tickets work: it is never optional."""
    where = PeerAddress(own_dht_host(config.dht_host), config.dht_port or 0)
    return Required("private DHT", str(where), "--dht-port")


class Discovery:
    """Runs a sequence of :class:`Finder` backends (the daemon's from
    :func:`configured_finders`; tests' in-memory ones), announces to all of them and merges
    what they find. It knows no backend by type."""

    def __init__(
        self, finders: Sequence[Finder], *, required: Mapping[Finder, Required] | None = None
    ) -> None:
        self.finders = list(finders)
        self._required = dict(required or {})
        self.lookup_latency = Histogram()
        """Seconds each find took over all backends (for /metrics)."""
        self.running: list[Finder] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for finder in self.finders:
                try:
                    await nursery.start(finder.serve)
                except (OSError, P2pfsError) as exc:
                    needed = self._required.get(finder)
                    if needed is not None:
                        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
                            raise PortInUseError(needed.what, needed.address, needed.flag) from exc
                        raise
                    # The others are best effort (LAN without broadcast, a Mainline port in
                    # use): the node works without them, and says so.
                    hint = " (--no-lan turns LAN discovery off)" if finder.name == "lan" else ""
                    logger.warning("discovery backend %s unavailable: %s%s", finder.name, exc, hint)
                    continue
                self.running.append(finder)
            logger.info("discovery: %s", ", ".join(f.name for f in self.running))
            task_status.started()

    async def announce(self, root: ContentHash) -> None:
        await self.announce_key(share_discovery_key(root))

    async def withdraw(self, root: ContentHash) -> None:
        """Stop announcing a share (records already stored elsewhere expire)."""
        await self.withdraw_key(share_discovery_key(root))

    async def withdraw_key(self, key: bytes) -> None:
        for finder in self.running:
            await finder.withdraw(key)

    async def announce_key(self, key: bytes) -> None:
        for finder in self.running:
            await finder.announce(key)

    def addresses_changed(self) -> None:
        """Every backend says what it announced again, from the new addresses."""
        for finder in self.running:
            finder.addresses_changed()

    async def find(self, root: ContentHash, limit: int = 16) -> list[Provider]:
        """Providers from every backend, merged, those carrying a NodeId first."""
        return await self.find_key(share_discovery_key(root), limit)

    async def find_key(self, key: bytes, limit: int = 16) -> list[Provider]:
        found: list[Provider] = []
        searching = list(self.running)

        async def ask(finder: Finder) -> None:
            try:
                found.extend(await finder.find(key, limit))
            except (OSError, P2pfsError) as exc:
                logger.info("discovery lookup via %s failed: %s", finder.name, exc)
            searching.remove(finder)
            if found and all(other.ends_by_silence for other in searching):
                scope.deadline = min(scope.deadline, trio.current_time() + FIND_GRACE)

        started = trio.current_time()
        with trio.move_on_after(FIND_TIMEOUT) as scope:
            async with trio.open_nursery() as nursery:
                for finder in self.running:
                    nursery.start_soon(ask, finder)
        self.lookup_latency.observe(trio.current_time() - started)
        return _merge(found)

    @property
    def backends(self) -> list[str]:
        return [finder.name for finder in self.running]


def dht_info(dht: DhtFinder) -> dict[str, Any]:
    """The private DHT's size and cost, for ``bench dht`` and tests to diff around a
    lookup. Counters written on the DHT thread are read here without a lock: each is an
    int read whole, possibly one datagram behind."""
    traffic = dht.traffic
    return {
        "k": dht.ksize,
        "client_mode": dht.client_mode,
        "contacts": dht.contacts(),
        "records": dht.records(),
        "lookups": dataclasses.asdict(dht.lookups),
        "traffic": {
            "sent": traffic.sent,
            "sent_bytes": traffic.sent_bytes,
            "received": traffic.received,
            "received_bytes": traffic.received_bytes,
            "dropped": traffic.dropped,
        },
    }


def dht_ksize(config: DiscoveryConfig, environ: Mapping[str, str]) -> int:
    """The configured k, else ``$P2PFS_DHT_K``, else the default; a bad value is refused."""
    if config.dht_ksize is not None:
        return config.dht_ksize
    text = environ.get(DHT_K_ENV)
    if text is None:
        return DEFAULT_KSIZE
    if not text.isdigit() or not 1 <= int(text) <= MAX_CONTACTS:
        raise LocalProtocolError(f"{DHT_K_ENV}={text!r}: k must be an integer in 1..{MAX_CONTACTS}")
    return int(text)


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _merge(found: Sequence[Provider]) -> list[Provider]:
    by_address: dict[PeerAddress, Provider] = {}
    for provider in found:
        known = by_address.get(provider.address)
        if known is None or (known.node_id is None and provider.node_id is not None):
            by_address[provider.address] = provider
    return sorted(by_address.values(), key=lambda p: p.node_id is None)
