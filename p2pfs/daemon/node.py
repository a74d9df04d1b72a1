"""The node daemon: owns the root nursery, the index, the QUIC endpoint, the share service
and the control API; SIGINT/SIGTERM shut it down cleanly."""

from __future__ import annotations

import errno
import gc
import logging
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2pfs.address import PeerAddress
from p2pfs.api import metrics as api_metrics
from p2pfs.api import server as api_server
from p2pfs.api.app import ApiApp
from p2pfs.discovery.dht.finder import DhtFinder
from p2pfs.errors import (
    ConnectionClosedError,
    LocalProtocolError,
    P2pfsError,
    StorageError,
    explaining_error,
)
from p2pfs.home import hold_home_lock, load_identity, tighten_home
from p2pfs.identity import Identity
from p2pfs.ids import ContentHash
from p2pfs.net import Endpoint, PeerConnection, TransportConfig, open_endpoint
from p2pfs.net.control import ControlKind
from p2pfs.store.folders import FolderStore
from p2pfs.store.index import INDEX_FILENAME, IndexStore
from p2pfs.store.scanner import scan_share
from p2pfs.swarm.stripes import DEFAULT_MAX_STRIPES
from p2pfs.sync.versions import short_device
from p2pfs.wire.ticket import Ticket, TicketKind

from .addresses import AddressBook
from .allocator import tune_allocator
from .control_client import SOCKET_NAME
from .control_server import ControlServer, Emit, pump_progress
from .dialback import DialBackService
from .dialer import Dialer
from .discovery import (
    Discovery,
    DiscoveryConfig,
    PortInUseError,
    configured_finders,
    dht_info,
    dht_required,
)
from .events import EventBus, RateMeter
from .fetches import Fetches, user_ticket
from .folders.engine import FolderSync
from .folders.manager import FolderConfig, FolderManager
from .folders.server import FolderServer
from .portmap import PortMapper
from .ratelimit import TokenBucket
from .reach import Reach
from .reachability import Reachability
from .relay import RelayLimits, guard
from .service import ShareService
from .storage import AsyncIndex
from .streams import TransferCounters
from .swarmfetch import peer_address_text
from .swarmstate import SwarmRegistry
from .workers import WorkerPool

logger = logging.getLogger(__name__)

TRANSPORT = TransportConfig(batched_receive=True)
"""qh3's batched receive costs a third of the receiver CPU. Its known fault (a stream's FIN
sometimes never reported) cannot hurt this protocol: every reply is length-framed and no
step waits for a FIN (a server stream whose FIN is lost ends with its connection), and a
lost byte of data would surface as a stall, never as a wrong byte."""
GIL_SWITCH_INTERVAL = 0.0005
GC_THRESHOLDS = (50_000, 20, 20)
"""The cyclic collector's generation thresholds (CPython's default: 700, 10, 10). A fetch
of small files allocates short-lived objects per packet, chunk and file; with the default
the first generation was collected every 700 and survivors promoted to the older ones, ~5%
of a receiver's CPU (issue 13's small-files profile)."""
SHUTDOWN_GRACE = 4.0
"""Seconds the endpoint gets to close connections on shutdown (the goal is 5 s in all)."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    home: Path
    listen: PeerAddress = field(default_factory=lambda: PeerAddress("::", 0))
    peers: tuple[PeerAddress, ...] = ()
    max_upload_rate: int | None = None
    max_download_rate: int | None = None
    """Bytes per second of chunk payload, for the whole daemon."""
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    folders: FolderConfig = field(default_factory=FolderConfig)
    relay: RelayLimits | None = None
    """Set (``--relay``): relay for others within these limits."""
    relay_via: tuple[PeerAddress, ...] = ()
    """Relays to stay registered with (``--relay-via``), to be reachable behind a NAT."""
    port_mapping: bool = True
    """Ask the gateway to map our UDP port (bound to a wildcard only; ``--no-port-mapping``)."""
    gui: PeerAddress | None = None
    """Serve the HTTP API and web UI here (``--gui``; a taken port falls back to a free one)."""
    data_workers: int = 0
    """Fetch from up to this many peers at once in worker processes (``--data-workers``)."""
    max_stripes: int = DEFAULT_MAX_STRIPES
    """Connections a fetch may run to one peer on a long path (``--stripes``; 1: one)."""
    link_datagrams: bool = True
    """Datagrams as big as the link carries to loopback and on-link peers (net/pathsize.py;
    ``--no-link-datagrams``: the base size to every peer)."""


NAT_SETTLE = 1.0
"""How long a starting node waits for its first peer to say where it sees it."""
NAT_RECHECK = 30.0
ADDRESS_POLL = 2.0
"""How often a node bound to a wildcard reads its interface addresses for a change (a laptop
on another network, a new DHCP lease): one getifaddrs, well under a millisecond."""
SHARE_RECHECK = 15 * 60.0
"""Every share is re-indexed this often (a stat walk: unchanged files are not read again);
one found stale (a chunk no longer reads back as indexed) at once."""
REPLACED_ANNOUNCED = 4
"""Earlier roots of one share still announced and answered "changed" (older ones are
withdrawn and forgotten, as are all at a restart)."""


class Node:
    share_service: type[ShareService] = ShareService
    """What serves shares; a test subclass plays a corrupt peer with its own
    (tests/support/hooked_daemon.py)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._transport = replace(TRANSPORT, link_sized_datagrams=config.link_datagrams)
        self.counters = TransferCounters()
        self._endpoint: Endpoint | None = None
        self._identity: Identity | None = None
        self._index: AsyncIndex | None = None
        self._discovery: Discovery | None = None
        self._dht: DhtFinder | None = None
        self._swarm = SwarmRegistry()
        """Shares being fetched, served to other fetchers meanwhile (until a restart)."""
        self._folders: FolderManager | None = None
        self._upload_limit = _bucket(config.max_upload_rate)
        self._download_limit = _bucket(config.max_download_rate)
        self._addresses: AddressBook | None = None
        self._dialer: Dialer | None = None
        self._root_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._service: ShareService | None = None
        self._fetches: Fetches | None = None
        self._reach: Reach | None = None
        self._reachability = Reachability()
        self._dial_back: DialBackService | None = None
        self._port_mapper: PortMapper | None = None
        self.events = EventBus()
        self._peer_rates = RateMeter()
        self._transfer_rates = RateMeter()
        self._api: api_server.ApiInfo | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Worker threads doing many small syscalls (creating files, reading chunks) give the
        # GIL up at each one and wait a whole switch interval to get it back while the event
        # loop is busy moving data: with 5 ms, writing 256 small files took 0.3-0.5 s in a
        # folder sync; with 0.5 ms, 0.1-0.27 s (measured here).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        gc.set_threshold(*GC_THRESHOLDS)
        tune_allocator()  # before the worker threads: see allocator.py
        home = self.config.home
        with hold_home_lock(home):
            tighten_home(home)
            _raise_open_file_limit()
            self._identity = load_identity(home)
            _private_file(home / INDEX_FILENAME)
            with IndexStore(home / INDEX_FILENAME) as index_store:
                await self._run_with_index(index_store, task_status)

    async def _run_with_index(
        self, index_store: IndexStore, task_status: trio.TaskStatus[None]
    ) -> None:
        assert self._identity is not None
        self._index = AsyncIndex(index_store)
        self._folders = FolderManager(
            self._index,
            self.counters,
            self._identity.node_id,
            self.config.folders,
            self.events,
            self._download_limit,
        )
        folder_server = FolderServer(
            self._index,
            self._folders.lookup,
            self._identity.node_id.raw,
            member_root=self._folders.member_root,
        )
        service = self.share_service(
            self._index,
            self.counters,
            self._upload_limit,
            self._swarm,
            folder_server,
            self._folders.folder_paths,
        )
        self._service = service
        listen = self.config.listen
        try:
            async with open_endpoint(
                self._identity,
                listen.host,
                listen.port,
                handler=self._serve_connection,
                config=self._transport,
            ) as endpoint:
                self._endpoint = endpoint
                await self._serve(endpoint, service, task_status)
                # Leaving the endpoint block closes every connection (CONNECTION_CLOSE sent).
        except OSError as exc:
            if self._endpoint is None and exc.errno == errno.EADDRINUSE:
                raise PortInUseError("QUIC", str(listen), "--listen HOST:PORT") from exc
            raise

    async def _serve(
        self, endpoint: Endpoint, service: ShareService, task_status: trio.TaskStatus[None]
    ) -> None:
        assert self._identity is not None
        self._addresses = AddressBook(
            *endpoint.local_address, dual_stack=len(endpoint.families) == 2
        )
        control = ControlServer(str(self.config.home / SOCKET_NAME), self._handlers())
        self._dht, finders = configured_finders(
            self.config.discovery, self._identity.node_id, endpoint.local_address[1], endpoint
        )
        self._discovery = Discovery(
            finders, required={self._dht: dht_required(self.config.discovery)}
        )
        self._reach = Reach(
            self._identity.node_id,
            self.config.relay,
            self.config.relay_via,
            (*self.config.peers, *self.config.discovery.bootstrap),
        )
        async with trio.open_nursery() as nursery:
            self._root_scope = nursery.cancel_scope
            self._nursery = nursery
            self._dialer = Dialer(endpoint, self._serve_connection, nursery)
            nursery.start_soon(_warm_up, endpoint)
            workers = None
            if self.config.data_workers > 0:
                workers = WorkerPool(
                    self.config.home,
                    self.config.data_workers,
                    TRANSPORT.batched_receive,
                    link_datagrams=self.config.link_datagrams,
                    verbose=logging.getLogger().isEnabledFor(logging.DEBUG),
                )
                await nursery.start(workers.run)
            self._fetches = Fetches(
                self._dialer,
                self._discovery,
                self.index,
                self.counters,
                self._swarm,
                self._download_limit,
                self.config.peers,
                workers,
                self.config.max_stripes,
            )
            if self.config.port_mapping and self._addresses.wildcard:
                self._port_mapper = PortMapper(
                    endpoint.local_address[1],
                    self._addresses.mapped,
                    ipv6_host=(
                        self._addresses.pinhole_ipv6
                        if socket.AF_INET6 in endpoint.families
                        else None
                    ),
                )
                await nursery.start(self._port_mapper.serve)
            # Made before the relay client dials (a peer we dial asks us back at once): a
            # DIAL_BACK that came before it was refused as if by an older node.
            self._dial_back = DialBackService(
                endpoint,
                self._addresses,
                self._reachability,
                dialer=self._dialer,
                known=(
                    *self.config.peers,
                    *self.config.discovery.bootstrap,
                    *self.config.relay_via,
                ),
                contacts=self._dht.contact_addresses if self._dht is not None else None,
                changed=self._reachability_changed,
            )
            await nursery.start(
                partial(
                    self._reach.serve,
                    endpoint,
                    self._dialer,
                    self._addresses,
                    self._dht,
                    needs_relay=self._needs_relay,
                )
            )
            await nursery.start(self._dial_back.serve)
            # Whether a NAT stands between us and our peers decides the DHT's mode, and
            # must be known before its first request: a node any other has added to its
            # routing table is contacted unasked, which makes a NAT refuse punches.
            await self._settle_nat()
            await nursery.start(self._discovery.serve)
            nursery.start_soon(self._track_nat)
            nursery.start_soon(self._watch_addresses)
            await self._announce_all()
            nursery.start_soon(self._keep_shares_current)
            await nursery.start(
                self.folders.serve, self._dialer, self._discovery, self.config.peers
            )
            await nursery.start(control.serve)
            if self.config.gui is not None:
                await nursery.start(self._serve_api, self.config.gui)
            nursery.start_soon(self._wait_for_signal, nursery.cancel_scope)
            logger.info(
                "node %s listening on %s%s, reachable at %s",
                self._identity.node_id,
                _format(endpoint.local_address),
                " (IPv6 and IPv4)" if len(endpoint.families) == 2 else "",
                ", ".join(str(a) for a in self._addresses.all()),
            )
            # What start-up built (modules, tables, the identity) lives as long as the
            # daemon: frozen, no later collection walks it again.
            gc.freeze()
            task_status.started()

    async def _settle_nat(self) -> None:
        """Give the first connections (to --peer, --bootstrap and --relay-via nodes, for
        relays) up to NAT_SETTLE to report where they see us, then set the DHT's mode."""
        assert self._addresses is not None and self._dht is not None
        known = self.config.peers or self.config.discovery.bootstrap or self.config.relay_via
        if self._addresses.wildcard and known:
            with trio.move_on_after(NAT_SETTLE):
                while not self._addresses.observations():
                    await trio.sleep(0.02)
        self._dht.client_mode = self._needs_relay()

    async def _track_nat(self) -> None:
        """Follow what peers report later (a mapping granted, a network changed)."""
        assert self._addresses is not None and self._dht is not None
        while True:
            await trio.sleep(NAT_RECHECK)
            self._dht.client_mode = self._needs_relay()

    def _needs_relay(self) -> bool:
        """Whether peers elsewhere may fail to reach us directly: a peer saw us through a
        NAT, or a dial-back found a family nobody reaches (a firewall). Then we look for
        relays, and our DHT stays a client: nodes that listed us would fail to reach us."""
        assert self._addresses is not None
        return self._addresses.seen_through_nat() or self._reachability.unreachable(
            trio.current_time()
        )

    def _reachability_changed(self) -> None:
        if self._dht is not None:
            self._dht.client_mode = self._needs_relay()

    async def _watch_addresses(self) -> None:
        """Announce everything again when this machine's addresses change: a DHT record
        names the address its announce came from, so until the next re-announce (20 min)
        a hint-less ticket's fetchers were sent to an address the node no longer has."""
        assert self._addresses is not None
        if not self._addresses.wildcard:
            return  # bound to one address: a change of it is the socket's end, not a move
        last = self._addresses.interfaces_now()
        while True:
            await trio.sleep(ADDRESS_POLL)
            now = self._addresses.interfaces_now()
            if now == last:
                continue
            logger.info(
                "this machine's addresses changed (%s -> %s): announcing again",
                ", ".join(sorted(last)),
                ", ".join(sorted(now)),
            )
            last = now
            self.discovery.addresses_changed()

    async def _wait_for_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info("signal %d: shutting down", signum)
                scope.cancel()
                return

    async def _serve_api(
        self, where: PeerAddress, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await trio.to_thread.run_sync(api_server.load_http_stack)
        except ImportError as exc:
            # A checkout whose environment predates the dependency: the node still runs.
            logger.warning("no HTTP API or web UI: %s (reinstall: pip install -e .)", exc)
            task_status.started()
            return
        key = api_server.load_key(self.config.home)
        sock = api_server.bind(where.host, where.port)
        self._api = api_server.ApiInfo(api_server.url_of(sock), key)
        app = ApiApp(key, self._handlers(), self.events, self._metrics)
        logger.info("HTTP API and web UI at %s", self._api.url)
        await api_server.serve(app, sock, task_status=task_status)

    async def _metrics(self) -> bytes:
        states: dict[str, int] = {}
        for folder in self.folders.folders.values():
            state = self._folder_state(folder)
            states[state] = states.get(state, 0) + 1
        counters = self.counters
        snapshot = api_metrics.Snapshot(
            bytes_by_kind={
                ("sent", "payload"): counters.payload_sent,
                ("sent", "protocol"): counters.protocol_sent,
                ("received", "payload"): counters.payload_received,
                ("received", "protocol"): counters.protocol_received,
            },
            peers=[
                api_metrics.PeerTraffic(
                    peer["node_id"],
                    peer["path"],
                    peer["bytes_sent"],
                    peer["bytes_received"],
                    peer["payload_sent"],
                    peer["payload_received"],
                )
                for peer in self._peers()
            ],
            chunks={
                "received": counters.chunks_received,
                "rejected": counters.chunks_rejected,
                "served": counters.chunks_served,
                "unreadable": counters.integrity_failures,
            },
            dht_lookups=self._dht.lookups.lookups if self._dht is not None else 0,
            lookup_latency=self.discovery.lookup_latency,
            folders_by_state=states,
            event_subscribers=self.events.subscribers,
            events_emitted=self.events.emitted,
            udp_buffers={
                "receive": self.endpoint.buffers.receive,
                "send": self.endpoint.buffers.send,
            },
            udp_kernel_drops=self.endpoint.kernel_drops(),
        )
        return api_metrics.render(snapshot)

    def _peers(self) -> list[dict[str, Any]]:
        """Open connections with their traffic and its rate now."""
        now = trio.current_time()
        peers = []
        rates = self._peer_rates
        for conn, summary in _peer_summaries(self.endpoint.connections):
            summary["bytes_sent"] = conn.bytes_sent
            summary["bytes_received"] = conn.bytes_received
            summary["payload_sent"] = conn.payload_sent
            summary["payload_received"] = conn.payload_received
            summary["send_rate"] = rates.rate((conn, "sent"), conn.bytes_sent, now)
            summary["receive_rate"] = rates.rate((conn, "received"), conn.bytes_received, now)
            summary["datagram_size"] = conn.datagram_size
            peers.append(summary)
        rates.keep_only(
            {(conn, way) for conn in self.endpoint.connections for way in ("sent", "received")}
        )
        return peers

    def _transfers(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        found = []
        for key, transfer in self.fetches.transfers.items():
            summary = asdict(transfer)
            summary["rate"] = self._transfer_rates.rate(key, transfer.bytes_done, now)
            found.append(summary)
        self._transfer_rates.keep_only(set(self.fetches.transfers))
        return found

    def _handlers(self) -> dict[str, Any]:
        return {
            "id": self._id,
            "status": self._status,
            "share": self._share,
            "ls": self._ls,
            "fetch": self._fetch,
            "find": self._find,
            "connect": self._connect,
            "sync": self._sync,
            "sync_list": self._sync_list,
            "sync_remove": self._sync_remove,
            "sync_show": self._sync_show,
            "sync_pause": self._sync_pause,
            "sync_resume": self._sync_resume,
            "sync_revert": self._sync_revert,
            "unshare": self._unshare,
            "conflicts": self._conflicts,
            "stop": self._stop,
        }

    # -- control API handlers -------------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint:
        assert self._endpoint is not None, "the node is not running"
        return self._endpoint

    @property
    def discovery(self) -> Discovery:
        assert self._discovery is not None, "the node is not running"
        return self._discovery

    async def _announce_all(self) -> None:
        """Shares survive restarts in the index; so do their announcements. (A sync folder's
        scan is a share too, but its root is never published: members reach it by proof.)"""
        for share in await self._plain_shares():
            await self.discovery.announce(share.root)

    async def _keep_shares_current(self) -> None:
        """A share whose files changed is indexed again and announced under its new root;
        the old root is answered that the share changed (ShareService.replaced)."""
        assert self._service is not None
        service = self._service
        while True:
            found = service.stale_found
            with trio.move_on_after(SHARE_RECHECK) as timer:
                await found.wait()
            for share in await self._plain_shares():
                if timer.cancelled_caught or share.root in service.stale:
                    await self._reindex(share)

    async def _reindex(self, share: Any) -> None:
        old = share.root
        try:
            result = await self.index.run(scan_share, share.local_path, self.index.index)
        except (LocalProtocolError, StorageError, OSError) as exc:
            logger.warning("share %s: indexing it again failed: %s", share.local_path, exc)
            return  # stays stale; tried again at the next recheck
        if result.root == old:
            return  # unchanged (a stale mark stays: a chunk did not read back; not retried)
        await self.discovery.announce(result.root)
        self._count_pieces_soon(result.root)
        await self._share_changed(share.local_path, old, result.root)
        logger.info(
            "share %s changed: indexed again, announced as %s", share.local_path, result.root
        )

    def _count_pieces_soon(self, root: ContentHash) -> None:
        """Count a new share's pieces now, not when its first fetcher asks (GetHave): for
        10,000 small files that was ~0.1 s of index reads the first fetch waited for, and
        its tree walk behind them (one index connection)."""
        assert self._nursery is not None and self._service is not None
        self._nursery.start_soon(self._service.count_pieces, root)

    async def _share_changed(self, path: str, old: ContentHash, new: ContentHash) -> None:
        """The share at ``path`` had root ``old`` and now has ``new`` (announced already)."""
        assert self._service is not None
        service = self._service
        # Tickets of every earlier root now lead to the newest (said only to the sharer).
        for earlier, newer in list(service.replaced.items()):
            if newer == old:
                service.replaced[earlier] = new
        service.replaced[old] = new
        service.stale.discard(old)
        # The last few old roots stay announced, so a peer holding an old ticket without
        # addresses still reaches us and hears that the share changed.
        previous = [root for root, newer in service.replaced.items() if newer == new]
        for dropped in previous[:-REPLACED_ANNOUNCED]:
            del service.replaced[dropped]
            await self.discovery.withdraw(dropped)
        self.events.emit("share-changed", path=path, root=new.hex(), previous=old.hex())

    async def _plain_shares(self) -> list[Any]:
        folder_paths = await self.index.run(_folder_paths, self.index.index)
        return [
            share
            for share in await self.index.run(self.index.index.shares)
            if share.root is not None and share.local_path not in folder_paths
        ]

    @property
    def folders(self) -> FolderManager:
        assert self._folders is not None, "the node is not running"
        return self._folders

    async def _sync(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        path = params.get("path")
        if not isinstance(path, str) or not path:
            raise LocalProtocolError("sync needs a directory")
        ticket = params.get("ticket")
        result = await self.folders.create_or_join(path, str(ticket) if ticket else None)
        folder = self.folders.find(result["path"])
        assert self._identity is not None
        result.update(
            self.folders.tickets(
                folder, self._identity.node_id, self.addresses.for_ticket(), self.reach.hints()
            )
        )
        self.events.emit("folder-added", path=result["path"], mode=result["mode"])
        return result

    async def _sync_show(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """A folder's tickets again (`p2pfs sync show DIR`): a lost ticket is not lost."""
        folder = self.folders.find(str(params.get("path", "")))
        assert self._identity is not None
        own = self._identity.node_id
        return {
            "path": folder.path,
            "mode": "rw" if folder.writable else "ro",
            **self.folders.tickets(folder, own, self.addresses.for_ticket(), self.reach.hints()),
        }

    async def _sync_list(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        folders = []
        for folder in self.folders.folders.values():
            summary = folder.summary()
            summary["peers"] = self.folders.links(folder)
            summary["members"] = self.folders.members(folder)
            # As conflict copies spell it (`name.sync-conflict-DATE-TIME-DEVICE.ext`).
            summary["device"] = short_device(folder.device)
            summary["state"] = self._folder_state(folder)
            # Our own need, as members hear it: "syncing N%" shows its percentage.
            completion = folder.need().as_dict()
            summary["completion"] = completion
            summary["progress"] = (
                completion["percent"]
                if folder.activity == "syncing" or completion["need_items"]
                else None
            )
            summary["conflicts"] = [
                c for c in self.folders.conflicts(folder) if c["kind"] == "conflict copy"
            ]
            folders.append(summary)
        return {"folders": folders}

    def _folder_state(self, folder: FolderSync) -> str:
        """idle, scanning, syncing, paused, or error (idle with problems to show)."""
        if folder.folder_id in self.folders.paused:
            return "paused"
        return "error" if folder.activity == "idle" and folder.problems else str(folder.activity)

    async def _sync_pause(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self.folders.pause(str(params.get("path", "")))

    async def _sync_resume(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self.folders.resume(str(params.get("path", "")))

    async def _sync_revert(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self.folders.revert(str(params.get("path", "")))

    async def _sync_remove(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        result = await self.folders.remove(str(params.get("path", "")))
        self.events.emit("folder-removed", **result)
        return result

    async def _conflicts(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        found = []
        for folder in self.folders.folders.values():
            for conflict in self.folders.conflicts(folder):
                found.append({"folder": folder.folder_id.hex(), "dir": folder.path, **conflict})
        return {"conflicts": found}

    @property
    def index(self) -> AsyncIndex:
        assert self._index is not None, "the node is not running"
        return self._index

    @property
    def addresses(self) -> AddressBook:
        assert self._addresses is not None, "the node is not running"
        return self._addresses

    async def _serve_connection(self, conn: PeerConnection) -> None:
        """Every authenticated connection, either way: note where the peer sees us, then
        serve the streams it opens (request streams and control streams)."""
        if self._reach is not None:
            self._reach.mark(conn)
        if self._dial_back is not None:
            self._dial_back.offer(conn)
        observed = conn.observed_address
        # Through a relay, both ends see only the tunnel's synthetic address.
        if observed is not None and self._addresses is not None and conn.path != "relayed":
            self._addresses.observed(PeerAddress(*observed), str(conn.remote_address[0]))
        assert self._service is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_control, conn, nursery)
            await self._service.handle_connection(conn)
            nursery.cancel_scope.cancel()

    async def _serve_control(self, conn: PeerConnection, nursery: trio.Nursery) -> None:
        while True:
            try:
                kind, stream = await conn.accept_control()
            except ConnectionClosedError:
                return
            what = f"{kind.name.lower()} stream from {conn.peer_id.short()}"
            if kind is ControlKind.DIAL_BACK and self._dial_back is not None:
                control = partial(self._dial_back.control, conn, stream)
            else:
                control = partial(self.reach.control, conn, kind, stream)
            nursery.start_soon(guard, what, control, stream)

    @property
    def reach(self) -> Reach:
        assert self._reach is not None, "the node is not running"
        return self._reach

    @property
    def dialer(self) -> Dialer:
        assert self._dialer is not None, "the node is not running"
        return self._dialer

    @property
    def fetches(self) -> Fetches:
        assert self._fetches is not None, "the node is not running"
        return self._fetches

    async def _ls(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self.fetches.ls(params, emit)

    async def _fetch(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        self.events.emit("fetch-started", ticket=params.get("ticket"), dest=params.get("dest"))
        try:
            result = await self.fetches.fetch(params, emit)
        except (P2pfsError, BaseExceptionGroup) as raised:
            # Told, then raised as it came (a nursery's group too: the caller unwraps it).
            ours = explaining_error(raised)
            if ours is not None:
                self.events.emit("error", what="fetch", dest=params.get("dest"), message=str(ours))
            raise
        self.events.emit("fetch-done", **{k: result[k] for k in ("root", "destination", "bytes")})
        return result

    async def _connect(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`p2pfs connect TICKET`: a new connection to the ticket's node, as a fetch would
        make it (addresses, then relays), timed; when it is relayed, the punch beside it."""
        ticket = user_ticket(params)
        if ticket.node_id is None:
            raise LocalProtocolError("that ticket names no node (it was made with --no-hints)")
        holder = object()
        started = trio.current_time()
        candidates = [c for c in await self.fetches.ticket_candidates(ticket) if c.node is not None]
        conn = await self.dialer.first(candidates, holder, what="the ticket's node", reuse=False)
        try:
            report: dict[str, Any] = {
                "node_id": str(conn.peer_id),
                "path": conn.path,
                "connect_seconds": trio.current_time() - started,
                "address": peer_address_text(conn),
                "punch": None,
            }
            if conn.path == "relayed":
                outcome = await self.reach.punch_outcome(conn)
                if outcome is not None:
                    report["punch"] = {
                        "succeeded": outcome.direct is not None,
                        "seconds": outcome.seconds,
                        "address": peer_address_text(outcome.direct) if outcome.direct else None,
                    }
            return report
        finally:
            self.dialer.release(conn, holder)

    async def _stop(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`p2pfs stop`: answer first, then shut down as on SIGTERM."""
        assert self._root_scope is not None

        async def later() -> None:
            await trio.sleep(0.05)  # let the answer reach the client
            logger.info("stop requested over the control socket: shutting down")
            assert self._root_scope is not None
            self._root_scope.cancel()

        assert self._nursery is not None
        self._nursery.start_soon(later)
        return {"pid": os.getpid(), "stopping": True}

    async def _id(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        assert self._identity is not None
        return {
            "node_id": str(self._identity.node_id),
            "addresses": [str(address) for address in self.addresses.all()],
            "observed": [
                {"address": str(address), "reporters": places}
                for address, places in self.addresses.observations()
            ],
            "engine": self.endpoint.engine.name,
            "discovery": self._discovery_info(),
            "relays": [
                {"node_id": str(hint.node_id), "address": str(hint.address)}
                for hint in self.reach.hints()
            ],
            "relay": self.reach.relay_info(),
            "port_mapping": self._port_mapper.info() if self._port_mapper else None,
            "reachability": self._reachability.info(
                trio.current_time(),
                tuple(6 if f == socket.AF_INET6 else 4 for f in self.endpoint.families),
            ),
            "api": self._api.to_json() if self._api is not None else None,
        }

    def _discovery_info(self) -> dict[str, Any]:
        assert self._dht is not None
        return {
            "backends": self.discovery.backends,
            "dht_port": self._dht.port,
            "dht": dht_info(self._dht),
        }

    async def _status(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        shares = await self._plain_shares()
        counters = asdict(self.counters)
        return {
            "node_id": str(self.endpoint.node_id),
            "peers": self._peers(),
            "shares": [self._share_info(share) for share in shares],
            "folders": len(self.folders.folders),
            "transfers": self._transfers(),
            "counters": counters,
            "transport": {
                "datagrams_dropped": self.endpoint.datagrams_dropped,
                "engine_failures": self.endpoint.engine_failures,
                "retries_sent": self.endpoint.retries_sent,
                "pending_handshakes": self.endpoint.pending_handshakes,
                "socket_buffer_wanted": self.endpoint.buffers.wanted,
                "receive_buffer": self.endpoint.buffers.receive,
                "send_buffer": self.endpoint.buffers.send,
                "kernel_drops": self.endpoint.kernel_drops(),
            },
            "punch": self.reach.punch_info(),
            "bytes_sent": counters["payload_sent"] + counters["protocol_sent"],
            "bytes_received": counters["payload_received"] + counters["protocol_received"],
        }

    def _share_info(self, share: Any) -> dict[str, Any]:
        """A share as `status` and the API list it: its ticket now, and the roots it had
        before its files changed (their tickets are answered that the share changed)."""
        assert self._service is not None and self._identity is not None
        service = self._service
        ticket = Ticket(
            TicketKind.SHARE,
            share.root,
            self._identity.node_id,
            tuple(self.addresses.for_ticket()),
            relays=self.reach.hints(),
        )
        return {
            "root": share.root.hex(),
            "path": share.local_path,
            "stale": share.root in service.stale,
            "ticket": ticket.encode(),
            "replaces": sorted(
                old.hex() for old, new in service.replaced.items() if new == share.root
            ),
        }

    async def _share(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        path = params.get("path")
        if not isinstance(path, str):
            raise LocalProtocolError("share needs a path")
        latest: list[dict[str, Any]] = []

        def progress(done_bytes: int, done_files: int) -> None:
            # Called in the scanner's thread; the pump forwards the latest value.
            latest.append({"bytes_done": done_bytes, "files_done": done_files})

        before = {share.local_path: share.root for share in await self._plain_shares()}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_progress, emit, latest)
            result = await self.index.run(scan_share, path, self.index.index, progress=progress)
            nursery.cancel_scope.cancel()
        await self.discovery.announce(result.root)
        self._count_pieces_soon(result.root)
        old = before.get(os.path.realpath(path))
        if old is not None and old != result.root:  # shared again after its files changed
            await self._share_changed(os.path.realpath(path), old, result.root)
        self.events.emit("share-added", root=result.root.hex(), path=path)
        hints = not params.get("no_hints", False)
        assert self._identity is not None
        ticket = Ticket(
            TicketKind.SHARE,
            result.root,
            self._identity.node_id if hints else None,
            tuple(self.addresses.for_ticket()) if hints else (),
            relays=self.reach.hints() if hints else (),
        )
        return {
            "ticket": ticket.encode(),
            "root": result.root.hex(),
            "name": result.manifest.name,
            "files": result.files,
            "bytes": result.bytes,
            "chunks": result.chunks,
            "problems": [{"path": p.path, "reason": p.reason} for p in result.problems],
        }

    async def _unshare(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`p2pfs unshare ROOT|PATH`: forget a share (its files stay) and stop announcing
        it; its ticket stops working here. A root may be given by a prefix of 8+ digits."""
        what = str(params.get("what", ""))
        found = [
            share
            for share in await self._plain_shares()
            if share.local_path == what
            or (len(what) >= 8 and share.root.hex().startswith(what.lower()))
        ]
        if len(found) != 1:
            why = "is not shared here" if not found else "names several shares: give more digits"
            raise LocalProtocolError(f"{what} {why} (`p2pfs status` lists the shares)")
        share = found[0]
        await self.index.run(self.index.index.forget_share, share.id)
        await self.discovery.withdraw(share.root)
        self.events.emit("share-removed", root=share.root.hex(), path=share.local_path)
        return {"root": share.root.hex(), "path": share.local_path, "unshared": True}

    async def _find(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Who holds a ticket's share, by discovery alone (the ticket's hints are ignored)."""
        ticket = user_ticket(params)
        started = time.monotonic()
        providers = await self.discovery.find(ticket.root)
        return {
            "root": ticket.root.hex(),
            "seconds": time.monotonic() - started,
            "providers": [
                {
                    "address": str(provider.address),
                    "node_id": str(provider.node_id) if provider.node_id else None,
                    "source": provider.source,
                }
                for provider in providers
            ],
        }


def _folder_paths(index: IndexStore) -> set[str]:
    return {row.local_path for row in FolderStore(index).folders()}


def _raise_open_file_limit() -> None:
    """Serving many peers and files takes descriptors; the soft limit is often only 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _peer_summaries(
    connections: frozenset[PeerConnection],
) -> list[tuple[PeerConnection, dict[str, Any]]]:
    """Authenticated, open connections only: a handshake in progress names no one yet."""
    summaries = []
    for conn in connections:
        if conn.is_closed:
            continue
        try:
            peer = conn.peer_id
        except ConnectionClosedError:
            continue
        address = peer_address_text(conn)
        summaries.append((conn, {"node_id": str(peer), "address": address, "path": conn.path}))
    return summaries


def _bucket(rate: int | None) -> TokenBucket | None:
    return TokenBucket(rate) if rate else None


def _private_file(path: Path) -> None:
    """Create ``path`` readable by its owner only, or make it so (the index holds folder
    write seeds; SQLite creates files with the umask's mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _format(address: tuple[str, int] | Any) -> str:
    return str(PeerAddress(str(address[0]), int(address[1])))


async def _warm_up(endpoint: Endpoint) -> None:
    """The QUIC engine's one-time costs, paid beside the start (Endpoint.warm_up)."""
    try:
        await trio.to_thread.run_sync(endpoint.warm_up)
    except (ConnectionClosedError, OSError) as exc:
        # Only the first connection's speed is at stake: it pays the cost instead.
        logger.info("QUIC engine warm-up failed: %s", exc)


async def run_node(config: NodeConfig) -> None:
    await Node(config).run()
