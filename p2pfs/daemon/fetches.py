"""The `fetch` and `ls` control handlers: finding a holder, one writer per destination,
the transfers `status` lists.

A holder comes from the dialer: the ticket's addresses and --peers first, then whoever
discovery finds, asked again every few seconds until the fetch's give-up time has passed
without one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from p2pfs.address import PeerAddress, parse_address
from p2pfs.content.folder import DIR_TREE, EntryKind, Manifest, manifest_root, share_bound
from p2pfs.errors import IntegrityError, LocalProtocolError
from p2pfs.ids import ContentHash, NodeId
from p2pfs.net import PeerConnection
from p2pfs.swarm.stripes import DEFAULT_MAX_STRIPES
from p2pfs.wire.ticket import Ticket, TicketError, parse_ticket_untrusted

from .control_server import Emit, pump_progress
from .dialer import Candidate, Dialer, DialError
from .discovery import Discovery
from .fetcher import Fetcher, FetchProgress
from .ratelimit import TokenBucket
from .requests import RequestStream
from .storage import AsyncIndex
from .streams import TransferCounters
from .swarmfetch import GIVE_UP_AFTER, REDISCOVER_INTERVAL, STALL_TIMEOUT
from .swarmstate import SwarmRegistry
from .treepush import TreePush
from .treewalk import WINDOW as WALK_WINDOW
from .treewalk import TreeJob, walk_trees
from .workers import WorkerPool

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Writer:
    root: bytes
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(slots=True)
class _Transfer:
    root: str
    destination: str
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    started: float = field(default_factory=time.monotonic)
    peers: list[dict[str, object]] = field(default_factory=list)


class Fetches:
    def __init__(
        self,
        dialer: Dialer,
        discovery: Discovery,
        index: AsyncIndex,
        counters: TransferCounters,
        swarm: SwarmRegistry,
        download_limit: TokenBucket | None,
        peers: tuple[PeerAddress, ...],
        workers: WorkerPool | None = None,
        max_stripes: int = DEFAULT_MAX_STRIPES,
    ) -> None:
        self._workers = workers
        self._max_stripes = max_stripes
        self._dialer = dialer
        self._discovery = discovery
        self._index = index
        self._counters = counters
        self._swarm = swarm
        self._download_limit = download_limit
        self._peers = peers
        self.transfers: dict[int, _Transfer] = {}
        self._next_transfer = 1
        self._writing: dict[str, _Writer] = {}
        """Destinations being fetched into (real paths), so two fetches never write one."""

    async def ls(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        ticket = user_ticket(params)
        holder = object()
        connect = self.holder_connector(ticket, _peer_list(params), holder, _give_up(params))
        conn = await connect(set())
        try:
            control = await RequestStream.open(conn, self._counters)
            # The directory trees come pushed with the manifest: one round trip however
            # deep the share (up to the push's budget; the rest is asked by hash).
            pushed = await TreePush.ask(
                conn, ticket.root, self._counters, reply_within=STALL_TIMEOUT, file_trees=False
            )
            try:
                manifest, entries = await self._list(ticket.root, control, pushed)
            finally:
                pushed.end()
            await control.close()
        finally:
            self._dialer.release_all(holder)
        return {
            "root": ticket.root.hex(),
            "name": manifest.name,
            "files": manifest.file_count,
            "bytes": manifest.tree.size,
            "entries": entries,
        }

    async def _list(
        self, root: ContentHash, control: RequestStream, pushed: TreePush
    ) -> tuple[Manifest, list[dict[str, Any]]]:
        """The share's manifest and every entry of its directory trees, level by level."""
        encoded = await control.manifest(root)
        if manifest_root(encoded) != root:
            raise IntegrityError("the peer's manifest does not match the ticket's root")
        manifest = Manifest.decode_untrusted(encoded)

        async def ask(hashes: list[Any]) -> list[bytes]:
            return await control.nodes(root, hashes, reply_within=STALL_TIMEOUT)

        async def fetch(hashes: list[Any]) -> list[bytes]:
            return await pushed.take(hashes, ask)

        entries: list[dict[str, Any]] = []
        bound = share_bound(manifest)
        level = [TreeJob(DIR_TREE, manifest.tree, tag="", bound=bound)]
        while level:
            await walk_trees(level, fetch, batch_size=WALK_WINDOW)
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
                        next_level.append(
                            TreeJob(DIR_TREE, entry.root, tag=f"{path}/", bound=bound)
                        )
            level = next_level
        return manifest, entries

    async def fetch(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        ticket = user_ticket(params)
        destination = params.get("dest")
        if not isinstance(destination, str) or not destination:
            raise LocalProtocolError("fetch needs a destination")
        extra = _peer_list(params)
        give_up = _give_up(params)
        real = os.path.realpath(destination)
        await self._claim_destination(real, ticket.root, emit)
        holder = object()  # this fetch's leases on connections
        transfer_id = self._next_transfer
        self._next_transfer += 1
        transfer = _Transfer(ticket.root.hex(), destination)
        self.transfers[transfer_id] = transfer
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
            await self._discovery.announce(ticket.root)

            async def more_peers(
                exclude: set[NodeId], deliver: Callable[[PeerConnection], None]
            ) -> None:
                candidates = await self._share_candidates(ticket, extra, discover=True)
                await self._dialer.each(candidates, holder, exclude=exclude, deliver=deliver)

            def release(conn: PeerConnection) -> None:
                self._dialer.release(conn, holder)

            def reconnect(node: NodeId, ended: PeerConnection) -> PeerConnection | None:
                conn = self._dialer.open_to(node)
                if conn is None or conn is ended:
                    return None
                self._dialer.acquire(conn, holder)
                return conn

            async def open_stripe(conn: PeerConnection) -> PeerConnection:
                candidate = Candidate(PeerAddress(*conn.dial_address), conn.peer_id, "stripe")
                return await self._dialer.first(
                    [candidate], holder, reuse=False, relay_lookup=False, what="a stripe"
                )

            fetcher = Fetcher(
                self.holder_connector(ticket, extra, holder, give_up),
                ticket.root,
                destination,
                self._index,
                self._counters,
                progress,
                self._download_limit,
                registry=self._swarm,
                more_peers=more_peers,
                release=release,
                give_up_after=give_up,
                overwrite=bool(params.get("overwrite")),
                workers=self._workers,
                open_stripe=open_stripe,
                max_stripes=self._max_stripes,
                reconnect=reconnect,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump_progress, emit, latest)
                report = await fetcher.run()
                nursery.cancel_scope.cancel()
        finally:
            del self.transfers[transfer_id]
            self._dialer.release_all(holder)
            self._writing.pop(real).done.set()
        return asdict(report)

    async def _claim_destination(self, real: str, root: bytes, emit: Emit) -> None:
        """One fetch writes into a destination at a time. A second fetch of the same share
        into it waits for the first, then finds its files complete; anything else that
        overlaps (another share, a directory inside the other) is refused."""
        while True:
            clash = next(
                (
                    (path, writer)
                    for path, writer in self._writing.items()
                    if path == real or _nested(path, real)
                ),
                None,
            )
            if clash is None:
                self._writing[real] = _Writer(root)
                return
            path, writer = clash
            if path != real or writer.root != root:
                raise LocalProtocolError(
                    f"another fetch is writing into {path}; wait for it to finish or fetch "
                    "into another directory"
                )
            logger.info("fetch into %s waits for the fetch already writing there", real)
            await emit({"waiting": f"another fetch of this share is writing into {real}"})
            await writer.done.wait()

    def holder_connector(
        self, ticket: Ticket, extra: list[PeerAddress], holder: object, give_up: float
    ) -> Callable[[set[NodeId]], Awaitable[PeerConnection]]:
        """A connection to a holder of the ticket's share, not one of those excluded: the
        ticket's addresses and --peers first, then whoever discovery finds, asked again
        every few seconds until ``give_up`` seconds have passed without one."""

        async def connect(exclude: set[NodeId]) -> PeerConnection:
            deadline = trio.current_time() + give_up
            while True:
                attempts: list[tuple[Candidate, str]] = []
                direct = await self._share_candidates(ticket, extra, discover=False)
                try:
                    return await self._dialer.first(direct, holder, exclude=exclude)
                except DialError as exc:
                    attempts.extend(exc.attempts)
                found = [
                    candidate
                    for candidate in await self._discovered(ticket)
                    if candidate.address not in {c.address for c in direct}
                ]
                try:
                    return await self._dialer.first(found, holder, exclude=exclude)
                except DialError as exc:
                    attempts.extend(exc.attempts)
                if trio.current_time() >= deadline:
                    if not attempts:
                        # Nothing dialled: no address at all, or only holders already
                        # tried (and passed over) by this fetch.
                        named = "names no other holder" if direct else "names no address"
                        raise DialError(
                            [],
                            f"a holder (the ticket {named} and discovery "
                            f"found no provider in {give_up:g} s)",
                        )
                    raise DialError(attempts)
                await trio.sleep(min(REDISCOVER_INTERVAL, deadline - trio.current_time()))

        return connect

    async def ticket_candidates(self, ticket: Ticket) -> list[Candidate]:
        """Where the ticket's node may be reached: its addresses and relays, or, for a
        ticket that names none, whoever discovery finds."""
        bare = not ticket.addresses and not ticket.relays
        return await self._share_candidates(ticket, [], discover=bare)

    async def _share_candidates(
        self, ticket: Ticket, extra: list[PeerAddress], *, discover: bool
    ) -> list[Candidate]:
        """The ticket's addresses (pinned to its node), then --peers (any node: whoever it
        is proves its key and content hashes check its data), then discovery's providers
        (pinned to their own NodeId where the backend gives one; Mainline's give none)."""
        pinned = ticket.node_id
        candidates = [Candidate(address, pinned, "ticket") for address in ticket.addresses]
        candidates += [Candidate(address, None, "peer") for address in extra]
        candidates += [Candidate(address, None, "peer") for address in self._peers]
        if discover:
            candidates += await self._discovered(ticket)
        # Relays last: every direct address gets its chance first (Happy Eyeballs order).
        if pinned is not None:
            candidates += [
                Candidate(hint.address, pinned, "relay", hint.node_id) for hint in ticket.relays
            ]
        return candidates

    async def _discovered(self, ticket: Ticket) -> list[Candidate]:
        return [
            Candidate(provider.address, provider.node_id, provider.source)
            for provider in await self._discovery.find(ticket.root)
        ]


def _peer_list(params: dict[str, Any]) -> list[PeerAddress]:
    peers = params.get("peers") or []
    if not isinstance(peers, list):
        raise LocalProtocolError("peers must be a list of HOST:PORT")
    return [parse_address(str(peer), allow_names=True) for peer in peers]


def user_ticket(params: dict[str, Any]) -> Ticket:
    """A ticket the user typed: a bad one is the user's input error, not a peer's."""
    try:
        return parse_ticket_untrusted(str(params.get("ticket", "")))
    except TicketError as exc:
        raise LocalProtocolError(str(exc)) from exc


def _give_up(params: dict[str, Any]) -> float:
    value = params.get("give_up_after", GIVE_UP_AFTER)
    if not isinstance(value, int | float) or value <= 0:
        raise LocalProtocolError("give_up_after must be a positive number of seconds")
    return float(value)


def _nested(a: str, b: str) -> bool:
    """One path is inside the other."""
    return a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")
