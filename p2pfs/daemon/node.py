"""The node daemon: owns the root nursery, the index, the QUIC endpoint, the share service
and the control API; SIGINT/SIGTERM shut it down cleanly."""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pfs.content.folder import DIR_TREE, EntryKind, Manifest, manifest_root
from p2pfs.errors import (
    AuthenticationError,
    ConnectionClosedError,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
)
from p2pfs.identity import Identity, NodeId, load_identity
from p2pfs.net import Endpoint, PeerConnection, TransportConfig, open_endpoint
from p2pfs.store.folders import FolderStore
from p2pfs.store.index import INDEX_FILENAME, IndexStore
from p2pfs.store.scanner import scan_share
from p2pfs.wire.ticket import PeerAddress, Ticket, TicketKind, parse_address, parse_ticket_untrusted

from .control_client import SOCKET_NAME
from .control_server import ControlServer, Emit
from .discovery import Discovery, DiscoveryConfig
from .fetcher import Fetcher, FetchProgress
from .folders.manager import FolderConfig, FolderManager
from .folders.server import FolderServer
from .ratelimit import TokenBucket
from .requests import RequestStream
from .service import ShareService, TransferCounters
from .storage import AsyncIndex
from .swarmstate import SwarmRegistry
from .treewalk import TreeJob, walk_trees

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
TRANSPORT = TransportConfig(batched_receive=True)
"""qh3's batched receive costs a third of the receiver CPU. Its known fault (a stream's FIN
sometimes never reported) cannot hurt this protocol: every reply is length-framed and no
step waits for a FIN (a server stream whose FIN is lost ends with its connection), and a
lost byte of data would surface as a stall, never as a wrong byte."""
GIL_SWITCH_INTERVAL = 0.0005
PROGRESS_INTERVAL = 0.2
SHUTDOWN_GRACE = 4.0
"""Seconds the endpoint gets to close connections on shutdown (the goal is 5 s in all)."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    home: Path
    listen: PeerAddress = field(default_factory=lambda: PeerAddress("0.0.0.0", 0))
    peers: tuple[PeerAddress, ...] = ()
    max_upload_rate: int | None = None
    max_download_rate: int | None = None
    """Bytes per second of chunk payload, for the whole daemon."""
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    folders: FolderConfig = field(default_factory=FolderConfig)
    test_serve_unverified: bool = False
    """Test hook: serve chunks without re-hashing them, to play a corrupt peer."""


@dataclass(slots=True)
class _Transfer:
    root: str
    destination: str
    peer: str
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    started: float = field(default_factory=time.monotonic)
    peers: list[dict[str, object]] = field(default_factory=list)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.counters = TransferCounters()
        self._transfers: dict[int, _Transfer] = {}
        self._next_transfer = 1
        self._endpoint: Endpoint | None = None
        self._identity: Identity | None = None
        self._index: AsyncIndex | None = None
        self._discovery: Discovery | None = None
        self._swarm = SwarmRegistry()
        """Shares being fetched, served to other fetchers meanwhile (until a restart)."""
        self._folders: FolderManager | None = None
        self._upload_limit = _bucket(config.max_upload_rate)
        self._download_limit = _bucket(config.max_download_rate)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Worker threads doing many small syscalls (creating files, reading chunks) give the
        # GIL up at each one and wait a whole switch interval to get it back while the event
        # loop is busy moving data: with 5 ms, writing 256 small files took 0.3-0.5 s in a
        # folder sync; with 0.5 ms, 0.1-0.27 s (measured here).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        home = self.config.home
        _raise_open_file_limit()
        self._identity = load_identity(home)
        with IndexStore(home / INDEX_FILENAME) as index_store:
            self._index = AsyncIndex(index_store)
            self._folders = FolderManager(
                self._index, self.counters, self._identity.node_id, self.config.folders
            )
            folder_server = FolderServer(
                self._index, self._folders.lookup, self._identity.node_id.raw
            )
            service = ShareService(
                self._index,
                self.counters,
                self._upload_limit,
                self._swarm,
                folder_server,
                self._folders.folder_paths,
            )
            service.verify_reads = not self.config.test_serve_unverified
            async with open_endpoint(
                self._identity,
                self.config.listen.host,
                self.config.listen.port,
                handler=service.handle_connection,
                config=TRANSPORT,
            ) as endpoint:
                self._endpoint = endpoint
                control = ControlServer(str(home / SOCKET_NAME), self._handlers())
                self._discovery = Discovery(
                    self.config.discovery, self._identity.node_id.raw, endpoint.local_address[1]
                )
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._discovery.serve)
                    await self._announce_all()
                    await nursery.start(
                        self._folders.serve,
                        endpoint,
                        self._discovery,
                        service.handle_connection,
                        self.config.peers,
                    )
                    await nursery.start(control.serve)
                    nursery.start_soon(self._wait_for_signal, nursery.cancel_scope)
                    logger.info(
                        "node %s listening on %s:%d",
                        self._identity.node_id,
                        *endpoint.local_address,
                    )
                    task_status.started()
            # Leaving the endpoint block closes every connection (CONNECTION_CLOSE sent).

    async def _wait_for_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info("signal %d: shutting down", signum)
                scope.cancel()
                return

    def _handlers(self) -> dict[str, Any]:
        return {
            "id": self._id,
            "status": self._status,
            "share": self._share,
            "ls": self._ls,
            "fetch": self._fetch,
            "find": self._find,
            "sync": self._sync,
            "sync_list": self._sync_list,
            "sync_remove": self._sync_remove,
            "conflicts": self._conflicts,
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
        result.update(self.folders.tickets(folder, self._identity.node_id.raw, self._addresses()))
        return result

    async def _sync_list(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        folders = []
        for folder in self.folders.folders.values():
            summary = folder.summary()
            summary["peers"] = self.folders.links(folder)
            folders.append(summary)
        return {"folders": folders}

    async def _sync_remove(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self.folders.remove(str(params.get("path", "")))

    async def _conflicts(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        found = []
        for folder in self.folders.folders.values():
            for conflict in folder.conflicts():
                found.append({"folder": folder.folder_id.hex(), "dir": folder.path, **conflict})
        return {"conflicts": found}

    @property
    def index(self) -> AsyncIndex:
        assert self._index is not None, "the node is not running"
        return self._index

    def _addresses(self) -> list[PeerAddress]:
        host, port = self.endpoint.local_address[:2]
        if host not in ("0.0.0.0", "::"):
            return [PeerAddress(host, port)]
        found = ["127.0.0.1"]
        try:
            for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
                address = str(info[4][0])
                if address not in found:
                    found.append(address)
        except OSError:
            logger.debug("no addresses for the host name; advertising loopback only")
        return [PeerAddress(address, port) for address in found]

    async def _id(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        assert self._identity is not None
        return {
            "node_id": str(self._identity.node_id),
            "addresses": [str(address) for address in self._addresses()],
            "engine": self.endpoint.engine.name,
            "discovery": self.discovery.info(),
        }

    async def _status(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        shares = await self._plain_shares()
        counters = asdict(self.counters)
        return {
            "node_id": str(self.endpoint.node_id),
            "peers": _peer_summaries(self.endpoint.connections),
            "shares": [{"root": share.root.hex(), "path": share.local_path} for share in shares],
            "folders": len(self.folders.folders),
            "transfers": [asdict(transfer) for transfer in self._transfers.values()],
            "counters": counters,
            "bytes_sent": counters["payload_sent"] + counters["protocol_sent"],
            "bytes_received": counters["payload_received"] + counters["protocol_received"],
        }

    async def _share(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        path = params.get("path")
        if not isinstance(path, str):
            raise LocalProtocolError("share needs a path")
        latest: list[dict[str, Any]] = []

        def progress(done_bytes: int, done_files: int) -> None:
            # Called in the scanner's thread; the pump forwards the latest value.
            latest.append({"bytes_done": done_bytes, "files_done": done_files})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_progress, emit, latest)
            result = await self.index.run(scan_share, path, self.index.index, progress=progress)
            nursery.cancel_scope.cancel()
        await self.discovery.announce(result.root)
        hints = not params.get("no_hints", False)
        assert self._identity is not None
        ticket = Ticket(
            TicketKind.SHARE,
            result.root,
            self._identity.node_id.raw if hints else None,
            tuple(self._addresses()) if hints else (),
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

    async def _find(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Who holds a ticket's share, by discovery alone (the ticket's hints are ignored)."""
        ticket = parse_ticket_untrusted(str(params.get("ticket", "")))
        started = time.monotonic()
        providers = await self.discovery.find(ticket.root)
        return {
            "root": ticket.root.hex(),
            "seconds": time.monotonic() - started,
            "providers": [
                {
                    "address": str(provider.address),
                    "node_id": str(NodeId(provider.node_id)) if provider.node_id else None,
                    "source": provider.source,
                }
                for provider in providers
            ],
        }

    async def _ls(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        ticket = parse_ticket_untrusted(str(params.get("ticket", "")))
        conn = await self._connect(ticket, _peer_list(params))
        try:
            control = await RequestStream.open(conn, self.counters)
            encoded = await control.manifest(ticket.root)
            if manifest_root(encoded) != ticket.root:
                raise IntegrityError("the peer's manifest does not match the ticket's root")
            manifest = Manifest.decode_untrusted(encoded)

            async def fetch(hashes: list[Any]) -> list[bytes]:
                return await control.nodes(ticket.root, hashes)

            entries: list[dict[str, Any]] = []
            level = [TreeJob(DIR_TREE, manifest.tree, tag="")]
            while level:
                await walk_trees(level, fetch)
                next_level = []
                for job in level:
                    for _offset, entry in job.leaves:
                        path = f"{job.tag}{entry.name}"
                        is_dir = entry.kind is EntryKind.DIRECTORY
                        entries.append(
                            {
                                "path": path,
                                "kind": "directory" if is_dir else "file",
                                "size": entry.size,
                                "executable": entry.executable,
                            }
                        )
                        if is_dir:
                            next_level.append(TreeJob(DIR_TREE, entry.root, tag=f"{path}/"))
                level = next_level
            await control.close()
        finally:
            await conn.close()
        return {
            "root": ticket.root.hex(),
            "name": manifest.name,
            "files": manifest.file_count,
            "bytes": manifest.tree.size,
            "entries": entries,
        }

    async def _fetch(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        ticket = parse_ticket_untrusted(str(params.get("ticket", "")))
        destination = params.get("dest")
        if not isinstance(destination, str) or not destination:
            raise LocalProtocolError("fetch needs a destination")
        extra = _peer_list(params)
        conn = await self._connect(ticket, extra)
        transfer_id = self._next_transfer
        self._next_transfer += 1
        transfer = _Transfer(ticket.root.hex(), destination, str(conn.peer_id))
        self._transfers[transfer_id] = transfer
        latest: list[dict[str, Any]] = []

        def progress(update: FetchProgress) -> None:
            transfer.peers = fetcher.peers()
            transfer.bytes_done = update.bytes_done
            transfer.bytes_total = update.bytes_total
            transfer.files_done = update.files_done
            transfer.files_total = update.files_total
            latest.append({**asdict(update), "peers": transfer.peers})

        try:
            # Other fetchers of this share find us (and trade pieces) while we fetch.
            await self.discovery.announce(ticket.root)

            async def more_peers(exclude: set[NodeId]) -> list[PeerConnection]:
                return await self._connect_more(ticket, extra, exclude)

            fetcher = Fetcher(
                conn,
                ticket.root,
                destination,
                self.index,
                self.counters,
                progress,
                self._download_limit,
                registry=self._swarm,
                more_peers=more_peers,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump_progress, emit, latest)
                report = await fetcher.run()
                nursery.cancel_scope.cancel()
        finally:
            del self._transfers[transfer_id]
            await conn.close()
        return asdict(report)

    async def _connect(self, ticket: Ticket, extra: list[PeerAddress]) -> PeerConnection:
        """The first reachable holder: the ticket's hints and --peer addresses first, then
        whoever discovery finds. A ticket's NodeId pins every candidate; otherwise a
        provider's own NodeId (from our DHT or LAN) pins it; Mainline providers come with
        no NodeId, and then the content's hashes are the only check."""
        pinned = NodeId(ticket.node_id) if ticket.node_id is not None else None
        direct = _direct_candidates(ticket, [*extra, *self.config.peers], pinned)
        failures: list[str] = []
        for address, expected in direct.items():
            conn = await self._try_connect(address, expected, failures)
            if conn is not None:
                return conn
        ipv6 = ":" in self.endpoint.local_address[0]
        providers = [
            provider
            for provider in await self.discovery.find(ticket.root)
            if (":" in provider.address.host) == ipv6  # our one socket speaks one family
        ]
        for provider in providers:
            expected = pinned
            if expected is None and provider.node_id is not None:
                expected = NodeId(provider.node_id)
            elif pinned is not None and provider.node_id not in (None, pinned.raw):
                continue  # a provider that is not the node the ticket names
            conn = await self._try_connect(provider.address, expected, failures)
            if conn is not None:
                return conn
        if not direct and not providers:
            raise RemoteProtocolError(
                "no holder found: the ticket names no address and discovery found no provider"
            )
        raise RemoteProtocolError(f"could not reach a holder ({'; '.join(failures)})")

    async def _connect_more(
        self, ticket: Ticket, extra: list[PeerAddress], exclude: set[NodeId]
    ) -> list[PeerConnection]:
        """Every other holder we can reach now (hints, --peer, discovery), concurrently."""
        pinned = NodeId(ticket.node_id) if ticket.node_id is not None else None
        candidates: dict[PeerAddress, NodeId | None] = {}
        candidates.update(_direct_candidates(ticket, [*extra, *self.config.peers], pinned))
        ipv6 = ":" in self.endpoint.local_address[0]
        for provider in await self.discovery.find(ticket.root):
            if (":" in provider.address.host) != ipv6:
                continue
            node = NodeId(provider.node_id) if provider.node_id is not None else None
            if node is not None and node in exclude:
                continue
            candidates.setdefault(provider.address, node)
        own = self.endpoint.node_id
        connected: list[PeerConnection] = []
        failures: list[str] = []

        async def attempt(address: PeerAddress, expected: NodeId | None) -> None:
            with contextlib.suppress(AuthenticationError):
                conn = await self._try_connect(address, expected, failures)
                if conn is None:
                    return
                if conn.peer_id in exclude or conn.peer_id == own:
                    conn.close_nowait(0, "already connected")
                    return
                connected.append(conn)

        async with trio.open_nursery() as nursery:
            for address, expected in candidates.items():
                nursery.start_soon(attempt, address, expected)
        return connected

    async def _try_connect(
        self, address: PeerAddress, expected: NodeId | None, failures: list[str]
    ) -> PeerConnection | None:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await self.endpoint.connect((address.host, address.port), expected)
        except AuthenticationError as exc:
            raise AuthenticationError(
                f"refused {address}: authentication failed, it is not the node the ticket "
                f"names ({exc})"
            ) from exc
        except (ConnectionClosedError, RemoteProtocolError, OSError, trio.TooSlowError) as exc:
            failures.append(f"{address}: {exc or type(exc).__name__}")
            return None


def _direct_candidates(
    ticket: Ticket, peers: list[PeerAddress], pinned: NodeId | None
) -> dict[PeerAddress, NodeId | None]:
    """The ticket's own addresses are its node's (pinned); a --peer may be any holder, so it
    is reached unpinned (whoever it is proves its key; content hashes check its data)."""
    candidates: dict[PeerAddress, NodeId | None] = dict.fromkeys(ticket.addresses, pinned)
    for address in peers:
        candidates.setdefault(address, None)
    return candidates


def _folder_paths(index: IndexStore) -> set[str]:
    return {row.local_path for row in FolderStore(index).folders()}


def _raise_open_file_limit() -> None:
    """Serving many peers and files takes descriptors; the soft limit is often only 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _peer_summaries(connections: frozenset[PeerConnection]) -> list[dict[str, str]]:
    """Authenticated, open connections only: a handshake in progress names no one yet."""
    summaries = []
    for conn in connections:
        if conn.is_closed:
            continue
        try:
            peer = conn.peer_id
        except ConnectionClosedError:
            continue
        summaries.append({"node_id": str(peer), "address": _format(conn.remote_address)})
    return summaries


def _bucket(rate: int | None) -> TokenBucket | None:
    return TokenBucket(rate) if rate else None


def _peer_list(params: dict[str, Any]) -> list[PeerAddress]:
    peers = params.get("peers") or []
    if not isinstance(peers, list):
        raise LocalProtocolError("peers must be a list of HOST:PORT")
    return [parse_address(str(peer)) for peer in peers]


def _format(address: tuple[str, int] | Any) -> str:
    return str(PeerAddress(str(address[0]), int(address[1])))


async def _pump_progress(emit: Emit, latest: list[dict[str, Any]]) -> None:
    """Forward the newest progress to the CLI at most every PROGRESS_INTERVAL (a display
    rate, not a poll: the work itself never waits on this)."""
    while True:
        await trio.sleep(PROGRESS_INTERVAL)
        if latest:
            event = latest[-1]
            latest.clear()
            try:
                await emit(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def run_node(config: NodeConfig) -> None:
    await Node(config).run()
