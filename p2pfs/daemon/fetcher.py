"""Fetching a share into a destination: manifest, trees, then pieces from every holder.

Order of work, each step verified before the next trusts it:
1. the manifest, checked against the root the ticket carries;
2. the directory trees, then every file's chunk tree, level by level, batched across trees
   (one request per batch of up to 256 nodes); every node is kept, to serve other fetchers;
3. the pieces (the share's unique chunks in tree order): those already here are taken
   first (files already complete at the destination, intact chunks left in temp files by an
   interrupted fetch, any file this node has indexed: moves and copies cost nothing), the
   rest from every holder at once (swarmfetch.py), while this node serves what it has to
   other fetchers. Every chunk is hashed before it is written; a file is renamed into place
   once complete and durable, in batches (store/assemble.py).

Memory: the share's chunk lists are held whole (~150 bytes a chunk: ~2 MB per GiB), the price
of a piece numbering every peer shares.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pfs.content.chunking import Chunker, ChunkRef, StreamCutter, chunk_id
from p2pfs.content.folder import (
    DIR_TREE,
    FILE_TREE,
    DirEntry,
    EntryKind,
    Manifest,
    file_tree,
    manifest_root,
    share_bound,
)
from p2pfs.content.pieces import tree_order_key, unique_pieces
from p2pfs.content.tree import TreeBuilder
from p2pfs.errors import (
    ConnectionClosedError,
    IntegrityError,
    LocalProtocolError,
    RemoteProtocolError,
    StorageError,
    StreamResetError,
)
from p2pfs.ids import ContentHash, NodeId, short_hex
from p2pfs.net import PeerConnection
from p2pfs.net.codes import CloseCode
from p2pfs.store.assemble import Finished, PartialFile, commit_files
from p2pfs.store.directories import SharedDirectories
from p2pfs.store.folderdisk import keep_version
from p2pfs.store.index import ChunkLocation, ChunkReader, IndexStore
from p2pfs.store.room import ToWrite, room_short
from p2pfs.swarm.picker import PiecePicker
from p2pfs.wire.codes import ErrorCode

from .mergedcalls import MergedCalls
from .ratelimit import TokenBucket
from .requests import RequestStream
from .storage import AsyncIndex, in_thread
from .streams import TransferCounters
from .swarmfetch import (
    GIVE_UP_AFTER,
    STALL_TIMEOUT,
    HoldersExhaustedError,
    MorePeers,
    OpenStripe,
    PeerPool,
    Reconnect,
    Release,
    Subscribed,
    close_connection,
    new_rng,
    subscribe_early,
)
from .swarmstate import PieceLocation, SwarmRegistry, SwarmShare
from .treepush import TreePush
from .treewalk import WINDOW as WALK_WINDOW
from .treewalk import TreeJob, walk_trees
from .workers import WorkerPool

logger = logging.getLogger(__name__)

LOCAL_BATCH = 64
"""Chunks copied from local files per worker-thread call."""
METADATA_STALLS = 2
"""Stalls (no reply within STALL_TIMEOUT) a holder's metadata may meet, each retried on a
new connection, before it is passed over for the next holder."""
COMMIT_FILES = 512
COMMIT_BYTES = 256 << 20
"""Finished files wait for a batch this big (or the end) to be made durable together."""


@dataclass(slots=True)
class FetchProgress:
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int


@dataclass(slots=True)
class FetchReport:
    root: str
    name: str
    destination: str
    files: int = 0
    directories: int = 0
    bytes: int = 0
    bytes_from_peer: int = 0
    """Chunk bytes written that came from peers."""
    bytes_local: int = 0
    """Copied from files this node already had (dedup)."""
    bytes_resumed: int = 0
    """Already in temp files left by an interrupted fetch."""
    bytes_present: int = 0
    """Files already complete at the destination."""
    seconds: float = 0.0
    first_byte_seconds: float | None = None
    """From the fetch's start to the first verified chunk written from a peer."""
    listed_seconds: float | None = None
    """From the fetch's start to every file listed (connection, manifest, directory trees):
    on a long path, one round trip per level of directories."""
    trees_seconds: float | None = None
    """From the fetch's start to every file's chunk tree walked (then the transfer)."""
    tree_nodes_pushed: int = 0
    """Tree nodes the first holder pushed with the manifest (GetTree), unasked."""
    tree_nodes_asked: int = 0
    """Tree nodes the walk still asked for by hash (GetNodes): past the push's budget, or
    all of them from a holder that pushes none."""
    replaced: list[str] = field(default_factory=list)
    """Files that differed and were replaced (--overwrite); the old ones are kept."""
    peers: list[dict[str, object]] = field(default_factory=list)
    """Per-peer contributions: node id, address, bytes, why it was dropped."""


@dataclass(slots=True)
class _FileTask:
    rel: str
    path: str
    entry: DirEntry
    leaves: list[tuple[int, ChunkRef]] = field(default_factory=list)
    partial: PartialFile | None = None
    filled: set[int] = field(default_factory=set)
    """Offsets whose chunk is written and verified."""
    remaining: int = 0
    complete: bool = False
    number: int = -1
    """Its place in the fetch's file list (how data-plane workers name it)."""
    identity: tuple[int, int] | None = None
    """(st_dev, st_ino) of its temp file, once opened for data-plane workers."""


Progress = Callable[[FetchProgress], None]
Connect = Callable[[set[NodeId]], Awaitable[PeerConnection]]
"""A connection to a holder not among those named (raises once none can be found)."""
Placements = list[list[tuple[_FileTask, int]]]
"""Per piece: every (file, offset) where its bytes go."""
_Targets = list[tuple[_FileTask, int]]
"""The (file, offset) slots a piece fills."""
_Writes = list[tuple[ChunkRef, bytes | memoryview, _Targets]]
"""Verified pieces to write: each chunk, its bytes and the (file, offset) slots it fills."""


class Fetcher:
    def __init__(
        self,
        connect: Connect,
        share_root: ContentHash,
        destination: str,
        index: AsyncIndex,
        counters: TransferCounters,
        progress: Progress | None = None,
        download_limit: TokenBucket | None = None,
        *,
        registry: SwarmRegistry | None = None,
        more_peers: MorePeers | None = None,
        release: Release | None = None,
        give_up_after: float = GIVE_UP_AFTER,
        overwrite: bool = False,
        workers: WorkerPool | None = None,
        open_stripe: OpenStripe | None = None,
        max_stripes: int = 1,
        reconnect: Reconnect | None = None,
    ) -> None:
        self._workers = workers
        self._reconnect = reconnect
        self._open_stripe = open_stripe
        self._max_stripes = max_stripes
        self._connect = connect
        self._release = release or close_connection
        self._give_up_after = give_up_after
        self._overwrite = overwrite
        self._top_dir = ""
        self._started = time.monotonic()
        self._files: list[_FileTask] = []
        self._download_limit = download_limit
        self._root = share_root
        self._destination = os.path.abspath(destination)
        self._index = index
        self._counters = counters
        self._progress = progress
        self._registry = registry if registry is not None else SwarmRegistry()
        self._more_peers = more_peers or _no_more_peers
        self._done_bytes = 0
        self._done_files = 0
        self._total_bytes = 0
        self._total_files = 0
        self._uncommitted: list[_FileTask] = []
        self._uncommitted_bytes = 0
        self._committer: trio.Nursery | None = None
        self._writer: MergedCalls[_Writes] | None = None
        self._commit_slot = trio.Semaphore(1)
        self._settling: dict[tuple[int, int], trio.Event] = {}
        """Slots (file number, offset) claimed by a write in progress, and its settling."""
        self._placements: Placements = []
        self._swarm: SwarmShare | None = None
        self._pool: PeerPool | None = None
        self.report = FetchReport(short_hex(share_root, 64), "", self._destination)

    async def run(self) -> FetchReport:
        try:
            return await self._run()
        finally:
            # A failed or cancelled fetch lets go of its temp files (their progress stays
            # for a resume): another fetch may take them over.
            _close_partials(self._files)  # no worker thread holds them: closing is instant

    async def _run(self) -> FetchReport:
        started = self._started = time.monotonic()
        conn, manifest, files, subscribed = await self._metadata(started)
        self._files = files
        swarm = self._swarm
        assert swarm is not None
        files.sort(key=lambda task: tree_order_key(task.rel))
        pieces = unique_pieces([ref for _offset, ref in task.leaves] for task in files)
        swarm.set_pieces(pieces)
        groups = self._plan(files, pieces)
        held = await self._take_what_is_here(files, pieces)
        logger.info(
            "fetch %s: %d of %d pieces here after %.2f s",
            manifest.name,
            len(held),
            len(pieces),
            time.monotonic() - started,
        )
        picker = PiecePicker(len(pieces), held, new_rng(), groups=groups)
        pool = self._pool = PeerPool(
            self._root,
            pieces,
            picker,
            self._counters,
            self._place_from_peer,
            self._download_limit,
            release=self._release,
            give_up_after=self._give_up_after,
            workers=self._workers,
            placement=self if self._workers is not None else None,
            open_stripe=self._open_stripe,
            max_stripes=self._max_stripes,
            reconnect=self._reconnect,
        )
        exhausted: HoldersExhaustedError | None = None
        # Full batches of finished files are committed (made durable, renamed) beside the
        # transfer, one at a time: the stream that completed a batch goes on reading.
        # Peers' batches are written by one thread call at a time (mergedcalls.py).
        async with trio.open_nursery() as committer:
            self._committer = committer
            writer = self._writer = MergedCalls(_write_batches)
            writing = trio.CancelScope()
            committer.start_soon(_serve_in, writing, writer)
            try:
                await pool.run(conn, self._more_peers, subscribed)
            except HoldersExhaustedError as exc:
                exhausted = exc
            finally:
                writing.cancel()  # every batch's stream is done: none is waiting
                self._writer = None
                self._committer = None
                self.report.peers = self.peers()
        if exhausted is not None:
            await self._commit(self._uncommitted)
            raise _missing_files_error(exhausted, files) from exhausted
        logger.info("fetch %s: swarm done after %.2f s", manifest.name, time.monotonic() - started)
        await self._commit(self._uncommitted)
        unfinished = [task.rel for task in files if not task.complete]
        if unfinished:
            raise RemoteProtocolError(f"{len(unfinished)} files incomplete, e.g. {unfinished[0]}")
        swarm.complete = True
        self.report.files = len(files)
        self.report.bytes = manifest.tree.size
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- manifest and layout --------------------------------------------------------------

    async def _metadata(
        self, started: float
    ) -> tuple[PeerConnection, Manifest, list[_FileTask], Subscribed]:
        """Manifest and trees from the first holder that serves them whole; a holder that
        refuses, stalls, breaks the protocol or sends a bad node is left for the next."""
        refused: set[NodeId] = set()
        reasons: list[str] = []
        stalls: dict[NodeId, int] = {}
        while True:
            try:
                conn = await self._connect(refused)
            except RemoteProtocolError as exc:
                if not reasons:
                    raise
                # No other holder: what the ones reached said is the answer to show.
                raise RemoteProtocolError(f"{'; '.join(reasons)} (no other holder: {exc})") from exc
            try:
                manifest, files, subscribed = await self._metadata_from(conn, started)
            except (
                RemoteProtocolError,
                IntegrityError,
                ConnectionClosedError,
                StreamResetError,
                trio.TooSlowError,
            ) as exc:
                reason = str(exc) or type(exc).__name__
                peer = conn.peer_id
                self._release(conn)
                if isinstance(exc, trio.TooSlowError) and stalls.get(peer, 0) < METADATA_STALLS:
                    # A stall is more often the path's than the holder's word: a fresh
                    # connection to it is tried before it is passed over. The only holder
                    # of a lossy path's fetch was given up after one stall (the test's 2%
                    # loss, under load; that stall was a dropped stream, since fixed).
                    stalls[peer] = stalls.get(peer, 0) + 1
                    logger.info("fetch: holder %s stalled: trying a new connection", peer.short())
                    conn.stalled()
                    conn.close_nowait(CloseCode.NO_ERROR, "stalled")
                    continue
                logger.info("fetch: holder %s could not serve: %s", peer.short(), reason)
                reasons.append(f"holder {peer.short()}: {reason}")
                refused.add(peer)
                continue
            return conn, manifest, files, subscribed

    async def _metadata_from(
        self, conn: PeerConnection, started: float
    ) -> tuple[Manifest, list[_FileTask], Subscribed]:
        # The path's round trip for the stripes' plan, in place of GetHave's: the engine's
        # sample from the handshake, or the manifest's if less. Both are taken before the
        # tree walk, whose big replies keep the server busy: on loopback the walk's samples
        # (11 ms) read as a long path, and four connections cost 0.3-0.5 s of CPU a side.
        sample = conn.latest_rtt
        control = await RequestStream.open(conn, self._counters)
        # Availability, the manifest and the pushed trees are asked at once: one round
        # trip for all three; the walk then asks only for what did not fit in the push.
        have = await subscribe_early(conn, self._root, self._counters)
        pushed = await TreePush.ask(conn, self._root, self._counters, reply_within=STALL_TIMEOUT)
        try:
            asked = trio.current_time()
            encoded, manifest = await self._manifest(control)
            round_trip = min(trio.current_time() - asked, math.inf if sample is None else sample)
            files = await self._listing(control, encoded, manifest, started, pushed)
        except BaseException:
            have.stream.reset(int(ErrorCode.CANCELLED))  # the server ends its subscription
            raise
        finally:
            self.report.tree_nodes_pushed = pushed.pushed
            self.report.tree_nodes_asked = pushed.asked
            pushed.end()
        return manifest, files, Subscribed(have, round_trip)

    async def _listing(
        self,
        control: RequestStream,
        encoded: bytes,
        manifest: Manifest,
        started: float,
        pushed: TreePush,
    ) -> list[_FileTask]:
        """The manifest's files, their directories made, their chunk trees walked."""
        self._total_bytes = manifest.tree.size
        self._total_files = manifest.file_count
        self.report.name = manifest.name
        swarm = SwarmShare(self._root, encoded)
        self._swarm = swarm
        self._registry.shares[self._root] = swarm
        top_dir, rename_single = self._layout(manifest)
        files = await self._walk_directories(control, manifest, top_dir, rename_single, pushed)
        self.report.listed_seconds = time.monotonic() - started
        logger.info(
            "fetch %s: %d files listed after %.2f s",
            manifest.name,
            len(files),
            self.report.listed_seconds,
        )
        await self._walk_files(control, files, manifest, pushed)
        self.report.trees_seconds = time.monotonic() - started
        logger.info("fetch %s: chunk trees after %.2f s", manifest.name, self.report.trees_seconds)
        await control.close()
        return files

    async def _manifest(self, control: RequestStream) -> tuple[bytes, Manifest]:
        with trio.fail_after(STALL_TIMEOUT):
            encoded = await control.manifest(self._root)
        if manifest_root(encoded) != self._root:
            raise IntegrityError("the peer's manifest does not match the ticket's root")
        return encoded, Manifest.decode_untrusted(encoded)

    async def _walk(
        self,
        control: RequestStream,
        jobs: list[TreeJob[Any]],
        pushed: TreePush,
    ) -> None:
        """Walk trees from the peer, taking pushed nodes first; keep their nodes (to serve
        other fetchers) only once walk_trees has verified every one against its parent."""
        fetched: dict[ContentHash, bytes] = {}

        async def ask(hashes: list[ContentHash]) -> list[bytes]:
            return await control.nodes(self._root, hashes, reply_within=STALL_TIMEOUT)

        async def fetch(hashes: list[ContentHash]) -> list[bytes]:
            nodes = await pushed.take(hashes, ask)
            fetched.update(zip(hashes, nodes, strict=True))
            return nodes

        await walk_trees(jobs, fetch, batch_size=WALK_WINDOW)
        assert self._swarm is not None
        self._swarm.nodes.update(fetched)

    def _layout(self, manifest: Manifest) -> tuple[str, str | None]:
        """Where the top directory goes; for a single file, the name it is written as."""
        if not manifest.single_file:
            _make_directory(self._destination)
            self._top_dir = self._destination
            return self._destination, None
        if os.path.isdir(self._destination):
            self._top_dir = self._destination
            return self._destination, None
        parent = os.path.dirname(self._destination)
        _make_directory(parent)
        self._top_dir = parent
        return parent, os.path.basename(self._destination)

    async def _walk_directories(
        self,
        control: RequestStream,
        manifest: Manifest,
        top_dir: str,
        rename_single: str | None,
        pushed: TreePush,
    ) -> list[_FileTask]:
        files: list[_FileTask] = []
        # Every directory tree of the share draws on one bound: the manifest's counts (a
        # few repeated nodes cannot expand into millions of entries).
        bound = share_bound(manifest)
        level: list[TreeJob[DirEntry]] = [
            TreeJob(DIR_TREE, manifest.tree, tag=("", top_dir), bound=bound)
        ]
        while level:
            await self._walk(control, level, pushed)
            next_level: list[TreeJob[DirEntry]] = []
            directories: list[str] = []
            for job in level:
                rel_prefix, disk_dir = job.tag
                if manifest.single_file and not rel_prefix:
                    _check_single_file(manifest, job.leaves)
                for _offset, entry in job.leaves:
                    rel = f"{rel_prefix}{entry.name}"
                    name = rename_single if rename_single and not rel_prefix else entry.name
                    path = os.path.join(disk_dir, name)
                    if entry.kind is EntryKind.DIRECTORY:
                        directories.append(path)
                        self.report.directories += 1
                        next_level.append(
                            TreeJob(DIR_TREE, entry.root, tag=(f"{rel}/", path), bound=bound)
                        )
                    else:
                        files.append(_FileTask(rel, path, entry))
            # A level's directories made in one thread call, not one each (a tree of 6,000
            # files in 120 directories of 3 subdirectories paid 480 thread hops).
            if directories:
                await in_thread(_make_directories, directories)
            level = next_level
        return files

    # -- files and pieces -----------------------------------------------------------------

    def peers(self) -> list[dict[str, object]]:
        """Each peer's contribution so far (for the report, `status` and progress)."""
        if self._pool is None:
            return []
        return [
            {
                "node_id": s.node_id,
                "address": s.address,
                "bytes": s.bytes,
                "requests": s.requests,
                "pieces_requested": s.pieces_requested,
                "failed": s.failed,
                "worker": s.worker,
                "connections": s.connections,
            }
            for s in self._pool.stats.values()
        ]

    async def _walk_files(
        self,
        control: RequestStream,
        files: list[_FileTask],
        manifest: Manifest,
        pushed: TreePush,
    ) -> None:
        # The manifest's minimum chunk size bounds each file's leaves by its size.
        schema = file_tree(manifest.chunker)
        jobs = [TreeJob(schema, task.entry.root, tag=task) for task in files]
        await self._walk(control, jobs, pushed)
        for job in jobs:
            job.tag.leaves = job.leaves

    def _plan(self, files: list[_FileTask], pieces: list[ChunkRef]) -> list[int]:
        """Where each piece goes; returns each piece's file (for in-order picking)."""
        index_of = {ref.id: number for number, ref in enumerate(pieces)}
        self._placements = [[] for _ in pieces]
        groups = [0] * len(pieces)
        for file_number, task in enumerate(files):
            task.number = file_number
            for offset, ref in task.leaves:
                piece = index_of[ref.id]
                if not self._placements[piece]:
                    groups[piece] = file_number
                self._placements[piece].append((task, offset))
        return groups

    async def _take_what_is_here(self, files: list[_FileTask], pieces: list[ChunkRef]) -> set[int]:
        """Pieces already on this node: complete files, resumable temp files, indexed files."""
        assert self._swarm is not None
        states = await in_thread(_existing_states, files)
        await self._keep_or_refuse([t for t, s in zip(files, states, strict=True) if s is _DIFFERS])
        complete = [state is _COMPLETE for state in states]
        resumed = await in_thread(_open_partials, files)
        to_write = [
            ToWrite(task.entry.size, task.partial.directory, task.partial.temp_name)
            for task, done in zip(files, complete, strict=True)
            if not done and task.partial is not None
        ]
        short = await in_thread(room_short, to_write)
        if short is not None:
            needed, free = short
            raise StorageError(
                f"{self._top_dir}: this fetch needs {needed / 1e6:.1f} MB more and its file "
                f"system has {free / 1e6:.1f} MB free; no file was written"
            )
        index_of = {ref.id: number for number, ref in enumerate(pieces)}
        held: dict[int, PieceLocation] = {}
        for task, done, present in zip(files, complete, resumed, strict=True):
            assert task.partial is not None
            if done:
                task.complete = True
                self.report.bytes_present += task.entry.size
                self._done_files += 1
                self._done_bytes += task.entry.size
                task.filled = {offset for offset, _ref in task.leaves}
            else:
                task.filled = set(present)
                task.remaining = len(task.leaves) - len(present)
            for offset, ref in task.leaves:
                if offset in task.filled:
                    held.setdefault(index_of[ref.id], PieceLocation(task.partial, offset))
                    if not done:
                        self.report.bytes_resumed += ref.length
                        self._done_bytes += ref.length
        self._report_progress()
        self._swarm.add(list(held.items()))
        # A piece held in one place may be wanted in others (a chunk twice in the share).
        for piece, location in held.items():
            if any(not t.complete and o not in t.filled for t, o in self._placements[piece]):
                where = [
                    ChunkLocation(path, location.offset, pieces[piece].length)
                    for path in location.candidate_paths()
                ]
                data = await in_thread(_read_local, [(pieces[piece], where)])
                if data[0] is not None:
                    await self._write([(piece, data[0])], pieces)
        await self._commit([t for t in files if not t.complete and t.remaining == 0])
        missing = [number for number in range(len(pieces)) if number not in held]
        return set(held) | await self._copy_local(missing, pieces)

    async def _keep_or_refuse(self, clashing: list[_FileTask]) -> None:
        """Files at the destination that differ from the share are never replaced silently:
        the fetch stops before writing anything, unless --overwrite, which keeps each old
        file under DEST/.p2pfs/versions/ (as sync folders keep replaced files)."""
        if not clashing:
            return
        if not self._overwrite:
            shown = ", ".join(task.path for task in clashing[:5])
            more = f" and {len(clashing) - 5} more" if len(clashing) > 5 else ""
            raise DestinationConflictError(
                f"{len(clashing)} files at the destination differ from the share and would be "
                f"replaced: {shown}{more}. Nothing was written; fetch into another directory, "
                "or pass --overwrite (the old files are kept in DEST/.p2pfs/versions/)"
            )
        top = self._top_dir
        for task in clashing:
            kept = await in_thread(keep_version, top, os.path.relpath(task.path, top), move=False)
            logger.info("fetch: replacing %s; the old file is kept as %s", task.path, kept)
            self.report.replaced.append(task.path)

    async def _copy_local(self, missing: list[int], pieces: list[ChunkRef]) -> set[int]:
        """Copy the missing pieces any indexed file of this node holds (dedup)."""
        refs = [pieces[piece] for piece in missing]
        located = await self._index.run(_locate_each, self._index.index, refs)
        copied: set[int] = set()
        candidates = [(p, where) for p, where in zip(missing, located, strict=True) if where]
        for start in range(0, len(candidates), LOCAL_BATCH):
            group = candidates[start : start + LOCAL_BATCH]
            datas = await in_thread(_read_local, [(pieces[piece], where) for piece, where in group])
            arrived: list[tuple[int, bytes | memoryview]] = [
                (piece, data) for (piece, _where), data in zip(group, datas, strict=True) if data
            ]
            for piece, _data in arrived:
                self.report.bytes_local += pieces[piece].length * len(self._placements[piece])
                copied.add(piece)
            await self._write(arrived, pieces)
        return copied

    async def _place_from_peer(
        self, arrived: list[tuple[int, bytes | memoryview]], peer: NodeId
    ) -> None:
        assert self._swarm is not None
        await self._write(arrived, self._swarm.pieces)
        self.report.bytes_from_peer += sum(len(data) for _piece, data in arrived)
        if self.report.first_byte_seconds is None:
            self.report.first_byte_seconds = time.monotonic() - self._started

    async def _write(
        self, arrived: list[tuple[int, bytes | memoryview]], pieces: list[ChunkRef]
    ) -> None:
        """Verify pieces (in a worker thread) and write each into every slot still empty;
        finished files are committed in batches (one sync for many files).

        A slot that another write in progress has claimed is left to it, and this call
        waits for that write to settle: if it failed (a bad chunk elsewhere in its batch,
        its peer cancelled), it gave its claims back and this copy, verified here, fills
        them. Without the wait the piece was counted held (this peer delivered it) while
        its slot stayed empty, and the swarm ended with a file incomplete."""
        while arrived:
            settling = await self._write_claimed(arrived, pieces)
            for event in {id(e): e for events in settling.values() for e in events}.values():
                await event.wait()
            arrived = [(piece, data) for piece, data in arrived if piece in settling]

    def _claim(self, piece: int, settled: trio.Event) -> tuple[_Targets, list[trio.Event]]:
        """Claim ``piece``'s empty slots (under ``settled``, set when the claiming write
        settles); also the events of the writes in progress that hold its other slots."""
        targets: _Targets = []
        pending: list[trio.Event] = []
        for task, offset in self._placements[piece]:
            if task.complete:
                continue
            if offset not in task.filled:
                targets.append((task, offset))
            elif (other := self._settling.get((task.number, offset))) is not None:
                pending.append(other)
        # Claimed before the write runs: an endgame duplicate of this piece arriving on
        # another stream meanwhile finds the slots taken, so a slot is never counted twice
        # and no file can be committed with a hole.
        for task, offset in targets:
            task.filled.add(offset)
            self._settling[(task.number, offset)] = settled
        return targets, pending

    async def _write_claimed(
        self, arrived: list[tuple[int, bytes | memoryview]], pieces: list[ChunkRef]
    ) -> dict[int, list[trio.Event]]:
        """One pass of ``_write``: the pieces' empty slots claimed, written and counted.
        Returns, per piece, the writes in progress that hold its other slots."""
        assert self._swarm is not None
        settled = trio.Event()
        writes: _Writes = []
        settling: dict[int, list[trio.Event]] = {}
        for piece, data in arrived:
            targets, pending = self._claim(piece, settled)
            if pending:
                settling[piece] = pending
            writes.append((pieces[piece], data, targets))
        try:
            if self._writer is not None:
                await self._writer.call(writes)
            else:
                await in_thread(_write_all, writes)
        except BaseException:
            for _ref, _data, targets in writes:
                for task, offset in targets:
                    task.filled.discard(offset)
            raise
        finally:
            for _ref, _data, targets in writes:
                for task, offset in targets:
                    self._settling.pop((task.number, offset), None)
            settled.set()
        await self._written(
            [
                (piece, ref, targets)
                for (piece, _d), (ref, _s, targets) in zip(arrived, writes, strict=True)
            ]
        )
        return settling

    async def _written(self, done: list[tuple[int, ChunkRef, list[tuple[_FileTask, int]]]]) -> None:
        """Pieces verified and written into these (claimed) slots: count them, serve them,
        commit the files they complete."""
        assert self._swarm is not None
        locations: list[tuple[int, PieceLocation]] = []
        for piece, ref, targets in done:
            for task, _offset in targets:
                self._done_bytes += ref.length
                task.remaining -= 1
                if task.remaining == 0:
                    task.complete = True
                    self._uncommitted.append(task)
                    self._uncommitted_bytes += task.entry.size
            if targets:
                task, offset = targets[0]
                assert task.partial is not None
                locations.append((piece, PieceLocation(task.partial, offset)))
        self._swarm.add(locations)
        if len(self._uncommitted) >= COMMIT_FILES or self._uncommitted_bytes >= COMMIT_BYTES:
            if self._committer is None:
                await self._commit(self._uncommitted)
            else:
                # Waits only while the previous batch is still being committed.
                await self._commit_slot.acquire()
                self._committer.start_soon(self._commit_beside, self._take_uncommitted())
        self._report_progress()

    # -- data-plane workers (swarmfetch.WorkerPlacement) --------------------------------

    async def targets(self, pieces: list[int]) -> list[list[tuple[int, int]]]:
        """Where a worker writes each piece: every slot of it in a file not complete yet
        (slots already claimed too: a worker writes the same verified bytes, and claiming
        them all when it lands leaves no slot waiting on a write that may fail). Temp files
        are created (and locked) here, before a worker may write into them."""
        places: list[list[tuple[int, int]]] = []
        to_open: dict[int, _FileTask] = {}
        for piece in pieces:
            slots = []
            for task, offset in self._placements[piece]:
                if task.complete:
                    continue
                slots.append((task.number, offset))
                if task.identity is None:
                    to_open[task.number] = task
            places.append(slots)
        if to_open:
            opened = list(to_open.values())
            identities = await in_thread(_writer_identities, opened)
            for task, identity in zip(opened, identities, strict=True):
                task.identity = identity
        return places

    def file_info(self, number: int) -> tuple[str, tuple[int, int]]:
        task = self._files[number]
        assert task.partial is not None and task.identity is not None
        return task.partial.temp_path, task.identity

    async def landed(self, pieces: list[int], peer: NodeId, gone: set[int]) -> None:
        """A worker verified and wrote these pieces into the slots targets() named (claimed
        ones too): each empty slot is counted now; one that a write in progress holds is
        counted once that write settles, if it failed and left the slot empty."""
        assert self._swarm is not None
        counted = 0
        while pieces:
            done = []
            waits: dict[int, trio.Event] = {}
            later = []
            for piece in pieces:
                ref = self._swarm.pieces[piece]
                targets, pending = self._claim(piece, trio.Event())
                for task, offset in targets:
                    assert task.partial is not None
                    # Nothing to settle: the bytes are already written.
                    del self._settling[(task.number, offset)]
                    if task.number in gone:
                        raise StorageError(f"{task.partial.temp_path} vanished while being fetched")
                    task.partial.mark_verified(offset, ref.length)
                done.append((piece, ref, targets))
                if pending:
                    later.append(piece)
                    waits.update((id(event), event) for event in pending)
            await self._written(done)
            if not counted:
                counted = sum(ref.length for _piece, ref, _targets in done)
            for event in waits.values():
                await event.wait()
            pieces = later
        self.report.bytes_from_peer += counted
        if self.report.first_byte_seconds is None:
            self.report.first_byte_seconds = time.monotonic() - self._started

    def _take_uncommitted(self) -> list[_FileTask]:
        batch, self._uncommitted, self._uncommitted_bytes = self._uncommitted, [], 0
        return batch

    async def _commit_beside(self, batch: list[_FileTask]) -> None:
        try:
            await self._commit(batch, pending=True)
        finally:
            self._commit_slot.release()

    async def _commit(self, tasks: list[_FileTask], *, pending: bool = False) -> None:
        """Commit ``tasks``; ``pending``: they were taken from the uncommitted files (and
        go back there if they could not be committed)."""
        if tasks is self._uncommitted:
            tasks, pending = self._take_uncommitted(), True
        if not tasks:
            return
        batch = list(tasks)
        for task in batch:
            task.complete = True
        finished = [Finished(task.partial, task.entry.executable) for task in batch]  # type: ignore[arg-type]
        try:
            await in_thread(commit_files, finished)
        except BaseException:
            if pending:
                # Not committed (a cancelled worker never starts the thread): the batch
                # goes back, for the fetch's last commit or a failure that names it. Lost
                # here, its files stayed temp files while the fetch reported success.
                self._uncommitted[:0] = batch
                self._uncommitted_bytes += sum(task.entry.size for task in batch)
            raise
        # One progress report per batch: per file, each built the peers' list and a
        # progress event (10,000 of them for a fetch of 10,000 small files).
        self._done_files += len(batch)
        self._report_progress()

    def _report_progress(self) -> None:
        if self._progress is not None:
            self._progress(
                FetchProgress(
                    self._done_bytes, self._total_bytes, self._done_files, self._total_files
                )
            )


def _missing_files_error(exc: HoldersExhaustedError, files: list[_FileTask]) -> RemoteProtocolError:
    """Name what is missing, for the user deciding whether to wait or re-run."""
    unfinished = [task.rel for task in files if not task.complete]
    example = f", e.g. {unfinished[0]}" if unfinished else ""
    return RemoteProtocolError(
        f"{exc}; {len(unfinished)} of {len(files)} files incomplete{example}. Partial data "
        "is kept: run the same fetch again to resume"
    )


async def _no_more_peers(exclude: set[NodeId], deliver: Callable[[PeerConnection], None]) -> None:
    await trio.lowlevel.checkpoint()


def _make_directories(paths: list[str]) -> None:
    for path in paths:
        _make_directory(path)


def _make_directory(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise StorageError(f"cannot create directory {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        # A symlink here could point anywhere: never write through it.
        raise StorageError(f"{path} exists and is not a directory")


def _check_single_file(manifest: Manifest, leaves: list[tuple[int, DirEntry]]) -> None:
    if len(leaves) != 1 or leaves[0][1].kind is not EntryKind.FILE:
        raise RemoteProtocolError("a single-file share must hold exactly one file")
    if leaves[0][1].name != manifest.name:
        raise RemoteProtocolError("a single-file share's file must carry the share's name")


class DestinationConflictError(LocalProtocolError):
    """Files at the destination differ from the share; the user decides (--overwrite)."""


_ABSENT, _COMPLETE, _DIFFERS = "absent", "complete", "differs"


def _existing_states(tasks: list[_FileTask]) -> list[str]:
    # One listing per directory first: a name not in it needs no lstat (a fetch into a new
    # directory of 10,000 files made 10,000 failed lstats, then as many failed opens).
    names = _Listings()
    return [_existing_state(task) if names.holds(task.path) else _ABSENT for task in tasks]


class _Listings:
    """The names in each directory, listed once; a directory that cannot be listed
    answers "maybe" for every name (the caller then looks the name up itself)."""

    def __init__(self) -> None:
        self._names: dict[str, set[str] | None] = {}

    def holds(self, path: str) -> bool:
        directory, name = os.path.split(path)
        if directory not in self._names:
            try:
                self._names[directory] = set(os.listdir(directory or "."))
            except OSError:
                self._names[directory] = None
        names = self._names[directory]
        return names is None or name in names


def _existing_state(task: _FileTask) -> str:
    """What the destination holds at a file's path: nothing, exactly this file (an earlier
    fetch finished it), or something else."""
    try:
        info = os.lstat(task.path)
    except FileNotFoundError:
        return _ABSENT
    if stat.S_ISDIR(info.st_mode):
        raise StorageError(f"{task.path} is a directory; the share has a file there")
    if not stat.S_ISREG(info.st_mode) or info.st_size != task.entry.size:
        return _DIFFERS
    if task.entry.size:
        builder = TreeBuilder(FILE_TREE)
        cutter = StreamCutter(Chunker())
        with open(task.path, "rb") as handle:
            while block := handle.read(4 << 20):
                builder.extend(ChunkRef(chunk_id(view), len(view)) for view in cutter.feed(block))
        builder.extend(ChunkRef(chunk_id(view), len(view)) for view in cutter.finish())
        if builder.finish() != task.entry.root:
            return _DIFFERS
    _set_executable(task.path, task.entry.executable)
    return _COMPLETE


def _close_partials(tasks: list[_FileTask]) -> None:
    for task in tasks:
        if task.partial is not None:
            task.partial.close()


def _open_partials(tasks: list[_FileTask]) -> list[set[int]]:
    """A PartialFile per task, and the offsets of chunks an earlier attempt left intact."""
    present = []
    names = _Listings()
    directories = SharedDirectories()  # one descriptor per directory, not one per file
    for task in tasks:
        task.partial = partial = PartialFile(
            os.path.dirname(task.path),
            os.path.basename(task.path),
            task.entry.hash,
            task.entry.size,
            directories=directories,
        )
        if names.holds(partial.temp_path):  # else no earlier attempt left one
            present.append(partial.verified_chunks(task.leaves))
            partial.close()
        else:
            present.append(set())
    return present


def _locate_each(index: IndexStore, wanted: list[ChunkRef]) -> list[list[ChunkLocation]]:
    return index.locate_chunks([ref.id for ref in wanted])


def _read_local(group: list[tuple[ChunkRef, list[ChunkLocation]]]) -> list[bytes | None]:
    with ChunkReader() as reader:
        return [reader.read_first_intact(ref.id, locations) for ref, locations in group]


def _writer_identities(tasks: list[_FileTask]) -> list[tuple[int, int]]:
    identities = []
    for task in tasks:
        assert task.partial is not None
        identities.append(task.partial.writer_identity())
    return identities


async def _serve_in(scope: trio.CancelScope, writer: MergedCalls[_Writes]) -> None:
    with scope:
        await writer.serve()


def _write_batches(batches: list[_Writes]) -> list[Exception | None]:
    """Each batch verified and written on its own: a bad chunk fails its batch only (its
    peer is the one to blame), a local write error its batch (the fetch then stops)."""
    errors: list[Exception | None] = []
    for writes in batches:
        try:
            _write_all(writes)
        except (IntegrityError, StorageError) as exc:
            errors.append(exc)
        else:
            errors.append(None)
    return errors


def _write_all(writes: _Writes) -> None:
    """Verify every chunk first, then write: nothing is written if any chunk is bad.

    A new file whose every chunk is here is written whole in one step (created, written,
    given its mode: store/assemble.py's write_new) and stays open for its commit, which
    comes once COMMIT_FILES are done; the rest chunk by chunk, and a file whose last
    chunks these are has its descriptor closed at once.
    """
    for ref, data, _targets in writes:
        if len(data) != ref.length or chunk_id(data) != ref.id:
            raise IntegrityError(f"chunk {short_hex(ref.id)} fails its hash")
    per_file: dict[int, tuple[_FileTask, list[tuple[int, bytes | memoryview]]]] = {}
    for _ref, data, targets in writes:
        for task, offset in targets:
            per_file.setdefault(id(task), (task, []))[1].append((offset, data))
    for task, parts in per_file.values():
        partial = task.partial
        assert partial is not None
        last = len(parts) == task.remaining
        whole = last and len(parts) == len(task.leaves) and partial.untouched
        if whole and partial.write_new(parts, task.entry.executable):
            continue
        for offset, data in parts:
            partial.write_verified(offset, data)
        if last:
            partial.close()


def _set_executable(path: str, executable: bool) -> None:
    mode = os.stat(path).st_mode
    wanted = mode | 0o111 if executable else mode & ~0o111
    if wanted != mode:
        os.chmod(path, wanted & 0o7777)
