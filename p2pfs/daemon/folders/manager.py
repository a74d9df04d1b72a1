"""All sync folders of a node: creating and joining them, finding and linking members,
watching the disk, and the control API behind `p2pfs sync` and `p2pfs conflicts`.

Links are symmetric: on every connection between two members each side proves membership
as a client, subscribes to the other's index root and pulls what it lacks. Connections come
from the node's one dialer (daemon/dialer.py), shared with fetches: a link leases its
connection and releases it when it ends.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import watchfiles

from p2pfs.address import PeerAddress
from p2pfs.content.tree import Child
from p2pfs.errors import (
    AuthenticationError,
    ConnectionClosedError,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
    StorageError,
    StreamResetError,
    first_leaf,
)
from p2pfs.ids import ContentHash, NodeId
from p2pfs.net import CloseCode, PeerConnection
from p2pfs.store import folderdisk as disk
from p2pfs.store.folders import FolderStore
from p2pfs.swarm.stripes import DEFAULT_MAX_STRIPES, MIN_BYTES_PER_STRIPE, stripes_for
from p2pfs.sync.keys import FolderKeys, device_id
from p2pfs.sync.versions import short_device
from p2pfs.waits import first_of
from p2pfs.wire.messages import FolderMember, FolderNeed
from p2pfs.wire.ticket import RelayHint, Ticket, TicketKind, parse_ticket_untrusted

from ..dialer import Candidate, Dialer, DialError
from ..discovery import Discovery
from ..events import EventBus
from ..liveness import close_when_silent
from ..ratelimit import TokenBucket
from ..requests import PeerRequestError
from ..storage import AsyncIndex
from ..streams import TransferCounters
from .client import FolderLink, Helper, refuse
from .engine import JOIN_BATCH, FolderSync

logger = logging.getLogger(__name__)

CONNECT_INTERVAL = 5.0
"""How often a folder looks for members it is not linked to."""
LOOKUP_BACKOFF_MAX = 60.0
"""A folder's discovery lookup that found no provider it had not found the time before
waits twice as long for the next, up to this; a link lost, or a new provider found, starts
again at CONNECT_INTERVAL. Why: every folder looked up its key every 5 s forever, and a DHT
lookup that finds no other member crawls the key's 2k nearest nodes (16-40 queries). Why
not longer: a member that came online, or a DHT that joined late, is found by the next
lookup; one that cannot dial us itself (we are firewalled, no relay) waits for it."""
RESCAN_INTERVAL = 60.0
"""Full rescans: the safety net under the file-system watcher, at least this far apart."""
RESCAN_SHARE = 0.01
"""...and, while the watcher works, far enough apart that they hold the folder's lock at
most this share of the time: a 200k-file folder's held it 2.3-3.9 s each minute, and an
edit noted meanwhile waited that long to reach the other members..."""
RESCAN_INTERVAL_WATCHED_MAX = 600.0
"""...but never further apart than this. Syncthing waits an hour with its watcher on, but
it hears when inotify's queue overflows; watchfiles does not report that (its issue #348),
so events lost that way wait for this safety net."""
WATCH_QUIET_MS = 30
"""A burst of file-system events ends after this long without one..."""
WATCH_MAX_WAIT_MS = 120
"""...or after this long in all; then the folder is rescanned. A write is on the wire in
about a tenth of a second (Syncthing's default waits 10 s). A file written in bursts with
pauses between them is recorded once per burst (each a version); the scanner re-reads a
file that changes while it reads it, so no version mixes two states."""
WATCH_THREAD_WAKE_MS = 300
TASK_RESTART_DELAY = 5.0
"""A folder task that failed unexpectedly starts again after this pause."""
HINTED_MEMBERS = 64
"""Member addresses heard from other members (FolderWelcome) kept per folder, untrusted
until a connection to them authenticates."""
KEEPALIVE_INTERVAL = 10.0
"""A quiet member link is pinged this often: it stays under the transport's 30 s idle
timeout, and a member that no longer answers (restarted, gone, its relay dead) is dropped
within ~12 s instead of at the idle timeout."""
RETRY_INTERVAL = 5.0
"""A reconcile that could not finish (a chunk not yet servable, a disk error) is retried."""
STALE_PROBE_TIMEOUT = 2.0
"""How long a link's connection may leave a PING unanswered, once the member has proved
itself on another connection, before the link moves to the new one (several probe
timeouts at any RTT a member link should keep)."""
STRIPE_JOIN_TIMEOUT = 10.0
"""A stripe's membership proof (two round trips) must be done within this."""


def full_rescan_delay(
    base: float, last_scan_s: float | None, *, watching: bool, fixed: bool = False
) -> float:
    """Seconds until a folder's next full rescan. Without a working watcher the full
    rescan is how changes are found: every ``base`` seconds. With one it is only the
    safety net: its cost is bounded to RESCAN_SHARE of the time, within
    [base, RESCAN_INTERVAL_WATCHED_MAX] (``base`` itself if larger). ``fixed``: ``base``
    whatever the cost (set by hand)."""
    if fixed or not watching or last_scan_s is None:
        return base
    bounded = min(last_scan_s / RESCAN_SHARE, RESCAN_INTERVAL_WATCHED_MAX)
    return max(base, bounded)


@dataclass(frozen=True, slots=True)
class FolderConfig:
    rescan_interval: float = RESCAN_INTERVAL
    rescan_interval_fixed: bool = False
    """Set by hand (`daemon --rescan-interval`): every ``rescan_interval`` seconds, not
    stretched by the scans' cost."""
    keep_versions_s: float = disk.DEFAULT_KEEP_VERSIONS_S
    watch: bool = True
    assume_case_insensitive: bool = False
    """Test hook: act as on a file system that ignores case (Linux' usually do not)."""
    join_batch: int = JOIN_BATCH
    """A member's differing records planned and applied per batch (a test hook makes it
    small, so a small folder's join runs in many batches)."""
    max_stripes: int = DEFAULT_MAX_STRIPES
    """Connections a link to a member on a long path may carry chunks over (``--stripes``;
    swarm/stripes.py)."""


class FolderManager:
    def __init__(
        self,
        index: AsyncIndex,
        counters: TransferCounters,
        own_id: NodeId,
        config: FolderConfig | None = None,
        events: EventBus | None = None,
        download_limit: TokenBucket | None = None,
    ) -> None:
        self._download_limit = download_limit
        self.events = events if events is not None else EventBus()
        self._index = index
        self._store = FolderStore(index.index)
        self._counters = counters
        self._own_id = own_id
        self.config = config or FolderConfig()
        self.folders: dict[bytes, FolderSync] = {}
        self._links: dict[tuple[bytes, bytes], FolderLink] = {}
        self._member_roots: dict[tuple[bytes, bytes], Child] = {}
        """The last index root each linked member announced."""
        self._member_needs: dict[tuple[bytes, bytes], FolderNeed] = {}
        """The last need each linked member reported (none from older peers)."""
        self._devices: dict[bytes, dict[bytes, bytes]] = {}
        """Per folder, members' device ids (node id -> device) as their FolderWelcome told
        (kept while the daemon runs: a member's conflict copies outlive its link)."""
        self.paused: set[bytes] = set()
        """Folders paused until `sync resume` (stored: a restart keeps them paused)."""
        self._nursery: trio.Nursery | None = None
        self._dialer: Dialer | None = None
        self._discovery: Discovery | None = None
        self._extra_peers: tuple[PeerAddress, ...] = ()
        self._hinted: dict[bytes, dict[bytes, PeerAddress]] = {}
        """Per folder: members other members named, not yet reached (bounded)."""
        self._lookups: dict[bytes, LookupPace] = {}
        """Per folder: when its next discovery lookup is due, and what the last one found."""
        self._ticket_relays: dict[bytes, list[Candidate]] = {}
        """Per folder, the relays the joining ticket named for its maker (kept until a
        restart; the private DHT's relay-for lookup finds them after that too)."""
        self._scopes: dict[bytes, trio.CancelScope] = {}
        self._folder_nurseries: dict[bytes, trio.Nursery] = {}

    def lookup(self, folder_id: bytes) -> FolderSync | None:
        """The folder to serve to a member (none while paused: nothing goes in or out)."""
        return None if folder_id in self.paused else self.folders.get(folder_id)

    def member_root(self, folder_id: bytes, node_id: bytes) -> Child | None:
        """The index root the member last announced to us (None: not linked here)."""
        return self._member_roots.get((folder_id, node_id))

    def folder_paths(self) -> set[str]:
        return {folder.path for folder in self.folders.values()}

    async def serve(
        self,
        dialer: Dialer,
        discovery: Discovery,
        peers: tuple[PeerAddress, ...] = (),
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._dialer = dialer
        self._discovery = discovery
        self._extra_peers = peers
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            paused = await self._index.run(self._store.paused_folders)
            for row in await self._index.run(self._store.folders):
                await self._start_folder(row, paused=row.id in paused)
            task_status.started()
            await trio.sleep_forever()

    async def _start_folder(self, row: Any, *, paused: bool = False) -> FolderSync:
        folder = FolderSync(row, self._index, self._store, self._member_in)
        folder.on_event = self.events.emit
        folder.join_batch = self.config.join_batch
        await folder.load(assume_case_insensitive=self.config.assume_case_insensitive)
        try:
            await folder.rescan()
        except (StorageError, LocalProtocolError, OSError) as exc:
            # A folder whose disk is missing still starts: it waits, says why, retries.
            logger.warning("folder %s: %s", folder.path, exc)
            folder.problems = [str(exc)]
        self.folders[folder.folder_id] = folder
        if paused:  # loaded and listed; nothing runs, nothing is announced or served
            self.paused.add(folder.folder_id)
            return folder
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._scopes[folder.folder_id] = scope
        await self._nursery.start(self._run_folder, folder, scope)
        if self._discovery is not None:
            await self._discovery.announce_key(folder.keys.discovery_key)
        return folder

    async def _run_folder(
        self,
        folder: FolderSync,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Every task of one folder, links included, runs here: removing the folder cancels
        them all, and a failure of one folder never reaches the daemon."""
        with scope:
            async with trio.open_nursery() as nursery:
                self._folder_nurseries[folder.folder_id] = nursery
                task_status.started()
                if self.config.watch:
                    nursery.start_soon(self._supervised, folder, "watcher", self._watch)
                nursery.start_soon(
                    self._supervised, folder, "periodic rescan", self._rescan_periodically
                )
                nursery.start_soon(self._supervised, folder, "member search", self._connect_members)

    async def _supervised(
        self, folder: FolderSync, what: str, task: Callable[[FolderSync], Awaitable[None]]
    ) -> None:
        """A folder task is a failure boundary: whatever it raises (a bug, a file name or a
        peer's input nobody foresaw) is logged once, shown in `sync list`, and the task
        starts again after a pause; the other folders and the daemon carry on.
        Cancellation is a BaseException and passes through."""
        while True:
            try:
                await task(folder)
                return
            except Exception as exc:  # the boundary described above
                logger.exception("folder %s: %s failed; restarting it", folder.path, what)
                folder.problems = [f"{what} failed: {type(exc).__name__}: {exc}"]
            await trio.sleep(TASK_RESTART_DELAY)

    # -- change detection -----------------------------------------------------------------

    async def _watch(self, folder: FolderSync) -> None:
        """File-system notifications, debounced, each followed by a (cheap) rescan."""

        prefix = folder.path.rstrip(os.sep) + os.sep

        def wanted(_change: watchfiles.Change, path: str) -> bool:
            # Called for every event (tens of thousands when a sync writes files): keep it
            # to string slicing.
            if not path.startswith(prefix):
                return False
            return folder.watched(path[len(prefix) :].replace(os.sep, "/"))

        # The events are drained here while the rescan they ask for waits in its own task:
        # a rescan waits for the folder's lock (a join holds it for minutes), and events
        # not drained meanwhile pile up in the watcher (40,000 of them, ~12 MiB, while a
        # 20k-file join placed its files); noted, they are only their directories.
        noted = [trio.Event()]

        async def rescan_when_noted() -> None:
            while True:
                await noted[0].wait()
                noted[0] = trio.Event()
                await self._rescan(folder)

        try:
            folder.watching = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rescan_when_noted)
                async for changes in watchfiles.awatch(
                    folder.path,
                    watch_filter=wanted,
                    debounce=WATCH_MAX_WAIT_MS,
                    step=WATCH_QUIET_MS,
                    recursive=True,
                    ignore_permission_denied=True,
                    # The watcher's thread returns this often even when nothing happens, so
                    # a shutdown never waits on it longer (its default of 5 s held SIGTERM up).
                    rust_timeout=WATCH_THREAD_WAKE_MS,
                ):
                    # Only the directories of these paths are listed again (cheap whatever
                    # the folder's size); the periodic full rescan is the safety net.
                    folder.note_changes(path for _change, path in changes)
                    noted[0].set()
                nursery.cancel_scope.cancel()
        except* (OSError, RuntimeError) as group:
            folder.watching = False
            logger.warning(
                "folder %s: watcher failed (%s); periodic rescans only",
                folder.path,
                first_leaf(group),
            )

    async def _rescan_periodically(self, folder: FolderSync) -> None:
        deferred = False
        while True:
            await trio.sleep(
                full_rescan_delay(
                    self.config.rescan_interval,
                    folder.last_full_scan_s,
                    watching=folder.watching,
                    fixed=self.config.rescan_interval_fixed,
                )
            )
            if folder.lock.locked() and not deferred:
                # Busy (a join holds the lock for minutes): the full rescan runs an interval
                # after it ends, not queued behind it, where the first change after a
                # 200k-file join waited for it (~3 s). Deferred once at most.
                async with folder.lock:
                    deferred = True
                continue
            deferred = False
            await self._rescan(folder, force=True)
            try:
                await trio.to_thread.run_sync(
                    disk.expire_versions, folder.path, self.config.keep_versions_s
                )
            except OSError as exc:
                logger.info("folder %s: expiring versions: %s", folder.path, exc)

    async def _rescan(self, folder: FolderSync, *, force: bool = False) -> None:
        try:
            await folder.rescan(force=force)
        except (StorageError, LocalProtocolError, OSError) as exc:
            logger.warning("folder %s: rescan failed: %s", folder.path, exc)
            folder.problems = [str(exc)]

    # -- members --------------------------------------------------------------------------

    def _member_in(self, folder: FolderSync, conn: PeerConnection) -> None:
        """A peer proved membership as a client on ``conn``: link back on the same
        connection (unless a link to that member exists)."""
        nursery = self._folder_nurseries.get(folder.folder_id)
        if nursery is None:
            return
        existing = self._links.get((folder.folder_id, conn.peer_id.raw))
        if existing is None:
            nursery.start_soon(self._link, folder, conn)
        elif existing.conn is not conn:
            nursery.start_soon(self._relink_if_stale, folder, existing, conn)

    async def _relink_if_stale(
        self, folder: FolderSync, existing: FolderLink, conn: PeerConnection
    ) -> None:
        """A member proved itself on a new connection while our link to it runs on an older
        one. A member that restarted does so, and its old connection then carries nothing
        until the idle timeout (30 s): our changes would not reach it, nor its ours, until
        then. If the old connection no longer answers, it is closed and the link moves to
        the new one. Both are alive when two members dial each other at once: the link
        stays where it is (no flapping between them)."""
        key = (folder.folder_id, conn.peer_id.raw)
        if await existing.conn.responsive(STALE_PROBE_TIMEOUT):
            return
        logger.info(
            "folder %s: %s reconnected; its old connection is silent: linking on the new one",
            folder.path,
            conn.peer_id.short(),
        )
        existing.conn.close_nowait(CloseCode.NO_ERROR, "superseded by a new connection")
        with trio.move_on_after(STALE_PROBE_TIMEOUT):
            while self._links.get(key) is existing:
                await trio.sleep(0.01)
        if key not in self._links and not conn.is_closed:
            await self._link(folder, conn)

    async def _connect_members(self, folder: FolderSync) -> None:
        while True:
            with contextlib.suppress(trio.TooSlowError):
                with trio.fail_after(30):
                    await self._connect_round(folder)
            await trio.sleep(CONNECT_INTERVAL)

    async def _connect_round(self, folder: FolderSync) -> None:
        """Dial every known member not linked yet: those met before (their authenticated
        addresses), those other members named, --peers, and discovery's providers. The
        known ones are dialled at once, not after the discovery lookup (which can take a
        second or more on a DHT that has few nodes)."""
        candidates: list[Candidate] = []
        for node_id, (host, port) in folder.peers.items():
            candidates.append(Candidate(PeerAddress(host, port), NodeId(node_id), "member"))
        candidates += self._ticket_relays.get(folder.folder_id, [])
        for node_id, address in self._hinted.get(folder.folder_id, {}).items():
            candidates.append(Candidate(address, NodeId(node_id), "named by a member"))
        candidates += [Candidate(a, None, "peer") for a in self._extra_peers]
        pace = self._lookups.setdefault(folder.folder_id, LookupPace())
        async with trio.open_nursery() as nursery:
            dialled = self._dial_candidates(nursery, folder, candidates)
            if self._discovery is not None and pace.due <= trio.current_time():
                found = [
                    Candidate(provider.address, provider.node_id, provider.source)
                    for provider in await self._discovery.find_key(folder.keys.discovery_key)
                ]
                pace.looked_up(
                    {(c.node, c.address) for c in found if c.node != self._own_id},
                    trio.current_time(),
                )
                self._dial_candidates(nursery, folder, found, dialled)

    def _dial_candidates(
        self,
        nursery: trio.Nursery,
        folder: FolderSync,
        candidates: list[Candidate],
        dialled: set[tuple[NodeId | None, PeerAddress]] | None = None,
    ) -> set[tuple[NodeId | None, PeerAddress]]:
        """Start a dial per member among ``candidates`` not linked (all of one member's
        addresses in one dial; each unpinned address on its own), leaving out the
        (member, address) pairs in ``dialled``; returns those dialled, ``dialled`` too. A
        member dialled already is dialled again at addresses new here (it may have moved)."""
        dialled = set() if dialled is None else dialled
        linked = {peer for (folder_id, peer) in self._links if folder_id == folder.folder_id}
        by_node: dict[NodeId | None, list[Candidate]] = {}
        for candidate in candidates:
            if candidate.node is not None and candidate.node.raw in linked:
                continue
            if candidate.node == self._own_id or (candidate.node, candidate.address) in dialled:
                continue
            by_node.setdefault(candidate.node, []).append(candidate)
        for node, group in by_node.items():
            if node is None:  # unpinned: each address may be another member
                for candidate in group:
                    nursery.start_soon(self._connect_one, folder, [candidate])
            else:
                nursery.start_soon(self._connect_one, folder, group)
        return dialled | {(c.node, c.address) for group in by_node.values() for c in group}

    async def _connect_one(self, folder: FolderSync, candidates: list[Candidate]) -> None:
        """Reach one member (any of its addresses) and link, unless a link exists."""
        assert self._dialer is not None
        key_holder = object()
        linked = [raw for (fid, raw) in self._links if fid == folder.folder_id]
        try:
            conn = await self._dialer.first(
                candidates,
                key_holder,
                exclude=[NodeId(raw) for raw in linked],
                what="a member",
            )
        except DialError as exc:
            logger.debug("folder %s: %s", folder.path, exc)
            return
        nursery = self._folder_nurseries.get(folder.folder_id)
        if (folder.folder_id, conn.peer_id.raw) in self._links or nursery is None:
            self._dialer.release(conn, key_holder)
            return
        # The link lives in the folder's nursery (the connect round has a deadline).
        nursery.start_soon(self._leased_link, folder, conn, key_holder)

    async def _leased_link(self, folder: FolderSync, conn: PeerConnection, holder: object) -> None:
        assert self._dialer is not None
        try:
            await self._link(folder, conn)
        finally:
            self._dialer.release(conn, holder)

    def _dial_named(self, folder: FolderSync, members: list[FolderMember]) -> None:
        """Dial at once the members a welcome named that we have no link to (at the
        address we met them at, else the one named), not at the next connect round: a
        joiner then meets every member within its first round trips, and they can help
        its first reconcile."""
        nursery = self._folder_nurseries.get(folder.folder_id)
        if nursery is None:
            return
        hinted = self._hinted.get(folder.folder_id, {})
        for member in members:
            key = (folder.folder_id, member.node_id)
            if member.node_id == self._own_id.raw or key in self._links:
                continue
            known = folder.peers.get(member.node_id)
            address = PeerAddress(*known) if known is not None else hinted.get(member.node_id)
            if address is not None:
                candidate = Candidate(address, NodeId(member.node_id), "named by a member")
                nursery.start_soon(self._connect_one, folder, [candidate])

    def _hint(self, folder: FolderSync, node_id: bytes, host: str, port: int) -> None:
        """Keep a member address another member named: an IP literal and a real port only
        (no names to resolve on a stranger's say, no port 0), at most HINTED_MEMBERS."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return
        if not 0 < port < 65536:
            return
        hinted = self._hinted.setdefault(folder.folder_id, {})
        if node_id in hinted or len(hinted) < HINTED_MEMBERS:
            hinted[node_id] = PeerAddress(host, port)

    async def _link(self, folder: FolderSync, conn: PeerConnection) -> None:
        key = (folder.folder_id, conn.peer_id.raw)
        if key in self._links:
            return
        link = FolderLink(
            conn,
            folder.keys,
            self._counters,
            self._own_id.raw,
            self._download_limit,
            work=folder.work,
        )
        self._links[key] = link
        stripe_holder = object()  # the link's leases on its stripes' connections
        try:
            asked = trio.current_time()
            members = await link.join()
            # The join is two round trips (and a signature each way).
            joined_in = (trio.current_time() - asked) / 2
            # Only an address that authenticated is remembered; addresses other members
            # name are candidates until a connection to them proves the member's key.
            if conn.path != "relayed":  # a circuit's synthetic address is no one's
                await folder.remember_peer(conn.peer_id.raw, *conn.dial_address)
            if link.device is not None:
                devices = self._devices.setdefault(folder.folder_id, {})
                devices[conn.peer_id.raw] = link.device
            self._hinted.get(folder.folder_id, {}).pop(conn.peer_id.raw, None)
            for member in members:
                if member.node_id != self._own_id.raw and member.node_id not in folder.peers:
                    self._hint(folder, member.node_id, member.host, member.port)
            self._dial_named(folder, members)
            logger.info("folder %s: linked with %s", folder.path, conn.peer_id.short())
            stripes = self._stripes_for(folder, conn, joined_in)
            link.stripes_pending = stripes - 1
            async with trio.open_nursery() as nursery:
                for _ in range(stripes - 1):
                    nursery.start_soon(self._stripe, folder, link, stripe_holder)
                await self._follow(folder, link)
                nursery.cancel_scope.cancel()
        except* (
            AuthenticationError,
            PeerRequestError,
            ConnectionClosedError,
            StreamResetError,
            StorageError,
            LocalProtocolError,
            OSError,
        ) as group:
            logger.info(
                "folder %s: link with %s ended: %s",
                folder.path,
                conn.peer_id.short(),
                first_leaf(group),
            )
        except* (RemoteProtocolError, IntegrityError) as group:
            # Forged, malformed or backwards records, or a chunk failing its hash: nothing
            # of it was applied; the member is dropped.
            refuse(conn, f"folder {folder.path}: {first_leaf(group)}")
        except* Exception as group:  # a link is a failure boundary
            # A bug met through one member's input ends that link only, with a log line.
            logger.exception(
                "folder %s: link with %s failed unexpectedly",
                folder.path,
                conn.peer_id.short(),
                exc_info=first_leaf(group),
            )
            conn.close_nowait(0, "internal error")
        finally:
            if self._dialer is not None:
                self._dialer.release_all(stripe_holder)
            link.stripes.clear()
            if self._links.get(key) is link:
                del self._links[key]
                self._member_roots.pop(key, None)
                self._member_needs.pop(key, None)
                self._lookups.pop(folder.folder_id, None)  # look for it again at once
            with trio.CancelScope(shield=True):
                await self._forget_link(folder, link)

    def _stripes_for(self, folder: FolderSync, conn: PeerConnection, joined_in: float) -> int:
        """Connections the link to ``conn``'s member carries chunks over (swarm/stripes.py)
        from the smaller of the join's round trip and the engine's latest sample; a link
        lives on, so what is left to move is not known: no limit from it."""
        if self._dialer is None or self.config.max_stripes <= 1:
            return 1
        sample = conn.latest_rtt
        rtt = joined_in if sample is None else min(joined_in, sample)
        linked = sum(1 for folder_id, _member in self._links if folder_id == folder.folder_id)
        plan = stripes_for(
            rtt,
            relayed=conn.path == "relayed",
            max_stripes=self.config.max_stripes,
            peers=max(1, linked),
            remaining_bytes=self.config.max_stripes * MIN_BYTES_PER_STRIPE,
        )
        if plan.stripes > 1:
            logger.info(
                "folder %s: %d connections to %s (%s)",
                folder.path,
                plan.stripes,
                conn.peer_id.short(),
                plan.reason,
            )
        return plan.stripes

    async def _stripe(self, folder: FolderSync, link: FolderLink, holder: object) -> None:
        """One more connection to the link's member, joined, carrying chunk batches while
        it lasts (kept alive, and closed when it stops answering, as the link is). One
        that cannot be opened or joined is given up with a log line: the link carries on."""
        assert self._dialer is not None
        conn = link.conn
        candidate = Candidate(PeerAddress(*conn.dial_address), conn.peer_id, "stripe")
        try:
            stripe = await self._dialer.first(
                [candidate], holder, reuse=False, relay_lookup=False, what="a stripe"
            )
            with trio.fail_after(STRIPE_JOIN_TIMEOUT):
                joined = await link.add_stripe(stripe)
        except (
            DialError,
            AuthenticationError,
            PeerRequestError,
            ConnectionClosedError,
            StreamResetError,
            trio.TooSlowError,
        ) as exc:
            logger.info("folder %s: no stripe to %s: %s", folder.path, conn.peer_id.short(), exc)
            return
        finally:
            link.stripe_attempt_over()
        try:
            await close_when_silent(stripe, KEEPALIVE_INTERVAL)
        finally:
            if joined in link.stripes:
                link.stripes.remove(joined)

    async def _forget_link(self, folder: FolderSync, link: FolderLink) -> None:
        try:
            await folder.link_ended(link)
        except StorageError as exc:  # kept until the daemon restarts: only disk, no harm
            logger.warning("folder %s: forgetting a link's vectors: %s", folder.path, exc)

    async def _follow(self, folder: FolderSync, link: FolderLink) -> None:
        """Reconcile whenever the member's root or ours changes and they differ; retry a
        failed or partial reconcile after RETRY_INTERVAL."""
        latest: list[Child] = []
        signed = [False]
        """Whether the member signed its latest root (a read-write member does)."""
        wake = [trio.Event()]

        key = (folder.folder_id, link.peer_id.raw)

        def on_root(root: ContentHash, records: int, need: FolderNeed | None, sig: bool) -> None:
            if need is not None:
                self._member_needs[key] = need
            if latest and latest[0].hash == root:
                return  # only the member's need changed: nothing to reconcile
            latest[:] = [Child(root, records)]
            signed[0] = sig
            self._member_roots[key] = latest[0]
            wake[0].set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.watch, on_root)
            nursery.start_soon(close_when_silent, link.conn, KEEPALIVE_INTERVAL)
            attempted: tuple[ContentHash, ContentHash] | None = None
            while True:
                arrived = wake[0]
                _root, _count, local_changed = folder.current_root()
                if latest:
                    pair = (latest[0].hash, folder.root.hash)
                    wanted = pair[0] != pair[1] or folder.missing_content()
                    if wanted and pair != attempted:
                        attempted = pair
                        try:
                            await folder.reconcile(
                                link,
                                latest[0],
                                root_signed=signed[0],
                                helpers=functools.partial(
                                    self._helpers, folder, link, latest[0].hash
                                ),
                            )
                        except* (
                            PeerRequestError,
                            StorageError,
                            LocalProtocolError,
                            OSError,
                        ) as group:
                            logger.info(
                                "folder %s: sync with %s incomplete: %s",
                                folder.path,
                                link.peer_id.short(),
                                first_leaf(group),
                            )
                        continue
                with trio.move_on_after(RETRY_INTERVAL) as timer:
                    await first_of(arrived, local_changed)
                if timer.cancelled_caught:
                    attempted = None
                if arrived.is_set():
                    wake[0] = trio.Event()

    def _helpers(self, folder: FolderSync, link: FolderLink, root: ContentHash) -> list[Helper]:
        """The folder's other members whose latest root is ``root`` (they hold what a
        reconcile toward it fetches) or that are placing ``root`` now (they hold what they
        have placed): they carry chunk batches beside ``link``."""
        helpers = []
        for key, other in self._links.items():
            if key[0] != folder.folder_id or other is link or other.conn.is_closed:
                continue
            at_root = functools.partial(self._member_at, key, root)
            if at_root() or other.placing.root == root:
                helpers.append(Helper(other, root, at_root))
        return helpers

    def _member_at(self, key: tuple[bytes, bytes], root: ContentHash) -> bool:
        root_now = self._member_roots.get(key)
        return root_now is not None and root_now.hash == root

    def links(self, folder: FolderSync) -> int:
        return sum(1 for (folder_id, _peer) in self._links if folder_id == folder.folder_id)

    def members(self, folder: FolderSync) -> list[dict[str, Any]]:
        """Linked members: how each reaches us, whether its index equals ours, and its
        completion as it reports it (None from a peer too old to report one)."""
        found = []
        for (folder_id, peer), link in self._links.items():
            if folder_id != folder.folder_id:
                continue
            remote = self._member_roots.get((folder_id, peer))
            need = self._member_needs.get((folder_id, peer))
            found.append(
                {
                    "node_id": str(link.peer_id),
                    "path": link.conn.path,
                    "records": remote.size if remote is not None else None,
                    "in_sync": remote is not None and remote.hash == folder.root.hash,
                    "completion": need.as_dict() if need is not None else None,
                    "device": short_device(link.device) if link.device is not None else None,
                }
            )
        return found

    def conflicts(self, folder: FolderSync) -> list[dict[str, str | bool | None]]:
        """The folder's conflicts, each copy's device tag matched to a member (this node
        included) if known."""
        devices = {**self._devices.get(folder.folder_id, {}), self._own_id.raw: folder.device}
        return folder.conflicts(devices)

    # -- control API ----------------------------------------------------------------------

    async def create_or_join(self, path: str, ticket_text: str | None) -> dict[str, Any]:
        local = os.path.realpath(path)
        if ticket_text is None:
            if not os.path.isdir(local):
                raise LocalProtocolError(f"{path} is not a directory")
            keys = FolderKeys.from_write_seed(os.urandom(32))
            hints: list[tuple[bytes, PeerAddress]] = []
            relays: list[Candidate] = []
        else:
            ticket = parse_ticket_untrusted(ticket_text)
            keys = _keys_of(ticket)
            hints = [(ticket.node_id.raw, a) for a in ticket.addresses] if ticket.node_id else []
            relays = [
                Candidate(hint.address, ticket.node_id, "relay (ticket)", hint.node_id)
                for hint in ticket.relays
                if ticket.node_id is not None
            ]
            os.makedirs(local, exist_ok=True)
        for folder in self.folders.values():
            if folder.path == local or _nested(folder.path, local):
                raise LocalProtocolError(f"{path} overlaps sync folder {folder.path}")
            if folder.folder_id == keys.folder_id:
                raise LocalProtocolError(f"this folder is already synced at {folder.path}")
        await trio.to_thread.run_sync(disk.write_marker, local)
        row = await self._index.run(
            self._store.add_folder,
            keys.folder_id,
            local,
            keys.read_key,
            keys.write_public,
            keys.write_seed,
            device_id(self._own_id.raw, os.urandom(16)),
            time.time_ns(),
        )
        for node_id, address in hints:
            await self._index.run(
                self._store.put_peer, row.id, node_id, address.host, address.port, time.time_ns()
            )
        if relays:
            self._ticket_relays[keys.folder_id] = relays
        folder = await self._start_folder(row)
        return {
            "folder": folder.folder_id.hex(),
            "path": folder.path,
            "mode": "rw" if keys.writable else "ro",
        }

    def tickets(
        self,
        folder: FolderSync,
        node_id: NodeId,
        addresses: list[PeerAddress],
        relays: tuple[RelayHint, ...] = (),
    ) -> dict[str, str]:
        """The folder's tickets, naming this node, its addresses and the relays it is
        registered with (a joiner behind another NAT reaches us through one)."""
        keys = folder.keys
        result = {}
        if keys.write_seed is not None:
            rw = Ticket(
                TicketKind.FOLDER_RW,
                ContentHash(keys.write_seed),
                node_id,
                tuple(addresses),
                relays=relays,
            )
            result["rw"] = rw.encode()
        ro = Ticket(
            TicketKind.FOLDER_RO,
            ContentHash(keys.read_key),
            node_id,
            tuple(addresses),
            keys.write_public,
            relays=relays,
        )
        result["ro"] = ro.encode()
        return result

    def find(self, path: str) -> FolderSync:
        local = os.path.realpath(path)
        for folder in self.folders.values():
            if folder.path == local:
                return folder
        raise LocalProtocolError(f"{path} is not a sync folder")

    async def pause(self, path: str) -> dict[str, Any]:
        """Stop the folder's watcher, scans and links, and serve it to no one, until
        ``resume``; its files and records stay as they are."""
        folder = self.find(path)
        if folder.folder_id not in self.paused:
            self.paused.add(folder.folder_id)
            self._scopes.pop(folder.folder_id).cancel()
            self._folder_nurseries.pop(folder.folder_id, None)
            async with folder.lock:  # an apply in a worker thread finishes first
                pass
            await self._index.run(self._store.set_paused, folder.row.id, True)
            if self._discovery is not None:
                await self._discovery.withdraw_key(folder.keys.discovery_key)
            folder.on_event(
                "folder-state", folder=folder.folder_id.hex(), dir=folder.path, state="paused"
            )
        return {"folder": folder.folder_id.hex(), "path": folder.path, "paused": True}

    async def resume(self, path: str) -> dict[str, Any]:
        folder = self.find(path)
        if folder.folder_id in self.paused:
            self.paused.discard(folder.folder_id)
            scope = trio.CancelScope()
            self._scopes[folder.folder_id] = scope
            assert self._nursery is not None
            await self._nursery.start(self._run_folder, folder, scope)
            await self._index.run(self._store.set_paused, folder.row.id, False)
            if self._discovery is not None:
                await self._discovery.announce_key(folder.keys.discovery_key)
            folder.on_event(
                "folder-state", folder=folder.folder_id.hex(), dir=folder.path, state="idle"
            )
            await self._rescan(folder, force=True)  # what changed while paused is recorded now
        return {"folder": folder.folder_id.hex(), "path": folder.path, "paused": False}

    async def revert(self, path: str) -> dict[str, Any]:
        """`sync revert`: a read-only member's local edits go to versions/ and the folder's
        files come back, fetched now from a linked member (else at the next link)."""
        folder = self.find(path)
        reverted, refetch = await folder.revert()
        for key, link in list(self._links.items()):
            remote = self._member_roots.get(key)
            if key[0] != folder.folder_id or remote is None or not refetch:
                continue
            fetched = False
            try:
                await folder.reconcile(link, remote)
                fetched = True
            except* (PeerRequestError, StorageError, OSError, ConnectionClosedError) as group:
                logger.info(
                    "folder %s: revert fetch incomplete: %s", folder.path, first_leaf(group)
                )
            if fetched:
                break
        pending = sorted(p for p in refetch if p in folder.absent)
        return {"path": folder.path, "reverted": reverted, "pending": pending}

    async def remove(self, path: str) -> dict[str, Any]:
        folder = self.find(path)
        # Its links end with its tasks; connections stay (other folders and shares use them).
        if (scope := self._scopes.pop(folder.folder_id, None)) is not None:
            scope.cancel()
        self.paused.discard(folder.folder_id)
        self._folder_nurseries.pop(folder.folder_id, None)
        self._lookups.pop(folder.folder_id, None)
        del self.folders[folder.folder_id]
        folder.close()  # members watching it hear that it is gone
        async with folder.lock:  # an apply in a worker thread finishes first
            pass
        await self._index.run(self._store.remove_folder, folder.row.id)
        share = await self._index.run(self._index.index.share_for_path, folder.path, 0)
        await self._index.run(self._index.index.forget_share, share.id)
        return {"folder": folder.folder_id.hex(), "path": folder.path, "removed": True}


def _keys_of(ticket: Ticket) -> FolderKeys:
    if ticket.kind is TicketKind.FOLDER_RW:
        return FolderKeys.from_write_seed(bytes(ticket.root))
    if ticket.kind is TicketKind.FOLDER_RO and ticket.write_public is not None:
        return FolderKeys(bytes(ticket.root), ticket.write_public)
    raise LocalProtocolError("that is a share ticket; use `p2pfs fetch` for it")


def _nested(a: str, b: str) -> bool:
    return a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


@dataclass(slots=True)
class LookupPace:
    """When a folder's next discovery lookup is due (LOOKUP_BACKOFF_MAX)."""

    due: float = -math.inf
    interval: float = CONNECT_INTERVAL
    found: set[tuple[NodeId | None, PeerAddress]] = field(default_factory=set)

    def looked_up(self, found: set[tuple[NodeId | None, PeerAddress]], now: float) -> None:
        if found - self.found:
            self.interval = CONNECT_INTERVAL
        else:
            self.interval = min(self.interval * 2, LOOKUP_BACKOFF_MAX)
        self.found = found
        self.due = now + self.interval
