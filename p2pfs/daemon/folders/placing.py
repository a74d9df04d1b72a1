"""Placing a reconcile's files on a sync folder's disk: local renames first, then downloads
in steps (file trees from local subtrees, chunks from any local file first, the rest from
the member), each step committed durably and recorded in the scan index at once."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from p2pfs.content.chunking import DEFAULT_CHUNKER, ChunkRef
from p2pfs.content.folder import file_tree
from p2pfs.content.tree import Child
from p2pfs.errors import IntegrityError
from p2pfs.ids import ContentHash
from p2pfs.store import folderdisk, room
from p2pfs.store.assemble import Finished, PartialFile, partial_name
from p2pfs.store.directories import SharedDirectories
from p2pfs.store.index import CHUNK_RECORD, ChunkLocation, ChunkReader, IndexStore
from p2pfs.store.leftovers import take_leftovers
from p2pfs.store.placed import PlacedFile, record_placed_files
from p2pfs.sync.records import SignedRecord
from p2pfs.sync.recordset import RecordSet
from p2pfs.sync.versions import FileVersion

from ..mergedcalls import MergedCalls
from ..requests import PeerRequestError
from ..storage import AsyncIndex, in_thread
from ..treewalk import TreeJob, walk_trees
from . import steps
from .client import MAX_BATCH, Arrived, FolderLink, Helper, refuse
from .underway import PlacingChunks
from .work import FolderWork

logger = logging.getLogger(__name__)

_FILE_TREE = file_tree(DEFAULT_CHUNKER)
"""Folders are cut by the default chunker: a file tree of S bytes has at most
ceil(S / 16 KiB) + 1 leaves, which bounds a member's tree bomb."""

CHUNK_BATCH_BYTES = 1 << 20
WRITES_IN_FLIGHT = 4
"""Bytes asked for per chunk request: small enough that writes overlap the transfer
(requests are queued on every stream, so their size adds no idle time). A step holds at
most WRITES_IN_FLIGHT answered batches waiting for the writer."""
STEP_FILES = 2048
STEP_BYTES = 64 << 20
STEPS_IN_FLIGHT = 2
"""Files are placed in steps of at most STEP_FILES / STEP_BYTES, a few at once, so one
step's durable commit overlaps the next one's transfer."""


@dataclass(slots=True)
class DiskView:
    """The folder's disk as the last scans saw it, and the files placed since."""

    scanned: Callable[[Collection[str]], Awaitable[dict[str, folderdisk.DiskState]]]
    """The regular files (synced or not yet recorded) at some paths: path -> state as last
    scanned or placed, read from the scan index when asked (no state per file is held)."""
    ignored: set[str] = field(default_factory=set)
    """What the scans left out as ignored: on a file system that ignores case, no placement
    may land on one of these names (it is reported as a collision)."""


@dataclass(slots=True)
class Planned:
    """What one reconcile does: records to store, files to place, files to move away."""

    records: list[SignedRecord] = field(default_factory=list)
    fetch: list[tuple[str, FileVersion]] = field(default_factory=list)
    """(destination path, version whose content goes there)."""
    delete: list[str] = field(default_factory=list)
    conflict_moves: dict[str, str] = field(default_factory=dict)
    """Local losers of a conflict: path -> conflict copy path (linked before replacement)."""
    waits_for: dict[str, str] = field(default_factory=dict)
    """Record path -> the destination that must be placed before the record is stored."""
    absent: set[str] = field(default_factory=set)
    """Paths whose records are stored without their content (ignored here)."""


@dataclass(slots=True)
class _StepTrees:
    """One step's files' chunk lists, once their trees are walked."""

    walked: trio.Event = field(default_factory=trio.Event)
    chunks_of: dict[str, list[tuple[int, ChunkRef]]] = field(default_factory=dict)


class Placer:
    """Performs a plan's renames and downloads for one folder."""

    def __init__(
        self,
        path: str,
        index: AsyncIndex,
        disk: DiskView,
        records: RecordSet,
        unplaced: dict[str, str],
        work: FolderWork,
        on_placed: Callable[[int, int], None],
        on_received: Callable[[int], None],
        placing: PlacingChunks,
    ) -> None:
        self.path = path
        self._index = index
        self.disk = disk
        self.records = records
        """The folder's records (the live mapping: a placed path's old version is read)."""
        self.unplaced = unplaced
        """Paths whose file could not be placed: path -> why (the folder reports them)."""
        self.work = work
        """The folder's work counters (the file-tree nodes walks ask members for)."""
        self.on_placed = on_placed
        """Told the files and bytes of each step once they are placed (progress)."""
        self.on_received = on_received
        """Told the bytes of each chunk received from a member (progress within a file)."""
        self.placing = placing
        """Chunks written toward the root being placed, not committed yet: other members
        taking the same change ask for them (underway.py)."""

    async def move_renamed(self, planned: Planned) -> dict[str, str]:
        """A file fetched under one path while the same content is deleted at another is a
        rename: the local file is renamed (no copy, no transfer). Returns {new: old}."""
        deleted_by_root: dict[tuple[ContentHash, bool], str] = {}
        for old in planned.delete:
            record = self.records.get(old)
            version = record.version if record is not None else None
            if version is not None and version.root is not None and not version.is_directory:
                key = (version.root, version.executable)
                deleted_by_root.setdefault(key, old)
        moves: dict[str, tuple[str, FileVersion]] = {}
        for new, version in planned.fetch:
            if new in planned.conflict_moves or version.root is None or version.is_directory:
                continue
            key = (version.root, version.executable)
            if key in deleted_by_root:
                moves[new] = (deleted_by_root.pop(key), version)
        if not moves:
            return {}
        roots = {new: version.root for new, (_old, version) in moves.items()}
        chunk_lists = await self._index.run(steps.chunk_lists, self._index.index, roots)
        scanned = await self.disk.scanned([*moves, *(old for old, _v in moves.values())])
        renamed = await in_thread(steps.rename_files, self.path, scanned, moves, chunk_lists)
        moved_from = {moves[new][0] for new in renamed}
        planned.fetch = [(path, version) for path, version in planned.fetch if path not in renamed]
        planned.delete = [path for path in planned.delete if path not in moved_from]
        if renamed:
            logger.info(
                "folder %s: %d renames done locally, no data moved", self.path, len(renamed)
            )
        stats = {new: st for new, (st, _packed) in renamed.items()}
        packed = {new: chunks for new, (_st, chunks) in renamed.items()}
        versions = {new: version for new, (_old, version) in moves.items()}
        await self._record_placed(stats, versions, {}, packed_chunks=packed)
        return {new: moves[new][0] for new in renamed}

    async def download(
        self,
        link: FolderLink,
        planned: Planned,
        timer: steps.Phases,
        helpers: Callable[[], Sequence[Helper]] = tuple,
    ) -> set[str]:
        """Place every file of ``planned.fetch``; returns the paths placed. ``helpers()``:
        other members at the same root or placing it now, whose streams carry chunk
        batches too (read again as batches complete: a member linked meanwhile joins in)."""
        for path, _version in planned.fetch:
            self.unplaced.pop(path, None)  # tried again now; reported again if it fails
        directories = [path for path, version in planned.fetch if version.is_directory]
        made = (
            await in_thread(steps.make_directories, self.path, directories)
            if directories
            else set()
        )
        items = [(path, version) for path, version in planned.fetch if not version.is_directory]
        if not items:
            return made
        # Subtrees this node holds (the same content anywhere, or the path's old version)
        # come from the index: a rename fetches no node, an edit only the nodes above it.
        known_roots = [version.root for _path, version in items if version.root is not None]
        # The paths' records in one read off the event loop (a query a path before).
        previous = await in_thread(self.records.records_at, [path for path, _v in items])
        # The paths' previous versions: an edit's unchanged runs are copied from them.
        old_roots = {path: old.version.root for path, old in previous.items() if old.version.root}
        del previous
        known_roots += old_roots.values()
        local_nodes = await self._index.run(steps.local_file_nodes, self._index.index, known_roots)

        async def fetch_nodes(hashes: list[ContentHash]) -> list[bytes]:
            missing = [h for h in hashes if h not in local_nodes]
            self.work.file_nodes_walked += len(missing)
            fetched = dict(zip(missing, await link.nodes(missing), strict=True)) if missing else {}
            return [local_nodes[h] if h in local_nodes else fetched[h] for h in hashes]

        parents = await in_thread(steps.make_all_parents, self.path, [path for path, _ in items])
        parts: list[list[tuple[str, FileVersion]]] = [[]]
        step_bytes = 0
        for path, version in items:
            if path not in parents:
                continue  # reported by make_all_parents; retried on a later reconcile
            if len(parts[-1]) >= STEP_FILES or step_bytes >= STEP_BYTES:
                parts.append([])
                step_bytes = 0
            parts[-1].append((path, version))
            step_bytes += version.size
        trees = [_StepTrees() for _ in parts]

        async def walk_in_order() -> None:
            # One walk at a time, in step order, while the steps before move data: walking
            # every tree of the batch first left the transfer idle meanwhile (7.4 s of a
            # 50k join).
            for number, step in enumerate(parts):
                jobs = [
                    TreeJob(_FILE_TREE, Child(version.root, version.size), tag=path)
                    for path, version in step
                    if version.size and version.root is not None
                ]
                await walk_trees(jobs, fetch_nodes, batch_size=MAX_BATCH * 4)
                trees[number].chunks_of = {job.tag: job.leaves for job in jobs}
                trees[number].walked.set()
                if number == 0:
                    timer.mark("trees")

        placed: set[str] = set()
        # Steps overlap: one commits (sync, renames) while the next moves data. Their
        # answered batches are written by one thread call at a time (mergedcalls.py).
        limit = trio.Semaphore(STEPS_IN_FLIGHT)
        writer: MergedCalls[Callable[[], None]] = MergedCalls(_run_writes)
        async with trio.open_nursery() as serving:
            serving.start_soon(writer.serve)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(walk_in_order)
                    for number, step in enumerate(parts):
                        await limit.acquire()
                        nursery.start_soon(
                            self._download_step,
                            link,
                            helpers,
                            step,
                            parents,
                            trees[number],
                            old_roots,
                            planned,
                            placed,
                            limit,
                            writer,
                        )
            finally:
                serving.cancel_scope.cancel()  # every step is done: no batch is waiting
        timer.mark("files")
        return placed | made

    async def _download_step(
        self,
        link: FolderLink,
        helpers: Callable[[], Sequence[Helper]],
        items: list[tuple[str, FileVersion]],
        parents: dict[str, str],
        trees: _StepTrees,
        old_roots: Mapping[str, ContentHash],
        planned: Planned,
        placed: set[str],
        limit: trio.Semaphore,
        writer: MergedCalls[Callable[[], None]],
    ) -> None:
        partials: dict[str, PartialFile] = {}
        failed: dict[str, str] = {}
        """Files of this step that cannot be placed now, path -> why (no room, a disk
        error; "" for content the member lacks): the others go ahead; these are retried
        on a later reconcile, and those with a why are listed in `sync list` meanwhile."""
        try:
            await trees.walked.wait()
            chunks_of = trees.chunks_of
            # A file that cannot fit is not fetched (the transfer was paid again at every
            # reconcile, and its temp file left no room for the files after it).
            to_write = []
            for path, version in items:
                assert version.root is not None
                name = partial_name(path.rsplit("/", 1)[-1], version.root)
                to_write.append(room.ToWrite(version.size, parents[path], name))
            lacking = await in_thread(room.lacking_room, to_write)
            failed.update((items[position][0], why) for position, why in lacking.items())
            directories = SharedDirectories()  # one descriptor per directory, not per file
            for path, version in items:
                assert version.root is not None
                if path in failed:
                    continue
                name = path.rsplit("/", 1)[-1]
                partials[path] = PartialFile(
                    parents[path], name, version.root, version.size, directories=directories
                )
            held = await in_thread(take_leftovers, partials, chunks_of)
            missing = await self._fill_from_local(partials, chunks_of, old_roots, failed, held)
            versions = dict(items)
            await self._fill_from_peer(
                link, helpers, partials, missing, failed, versions, chunks_of, writer
            )
            finished = [
                Finished(partials[path], version.executable, version.mtime_ns)
                for path, version in items
                if path not in failed
            ]
            if failed:
                logger.info(
                    "folder %s: %d files not placed this time (first: %s)",
                    self.path,
                    len(failed),
                    min(failed),
                )
            scanned = await self.disk.scanned([path for path, _version in items])
            renamed, unplaced = await in_thread(
                steps.commit_placed, self.path, scanned, finished, planned.conflict_moves
            )
            await self._record_placed(renamed, dict(items), chunks_of)
            placed.update(renamed)
            self.on_placed(
                len(renamed), sum(version.size for path, version in items if path in renamed)
            )
            for path in renamed:
                self.unplaced.pop(path, None)
            self.unplaced.update(unplaced)
            self.unplaced.update((path, why) for path, why in failed.items() if why)
        finally:
            for partial in partials.values():
                partial.close()
            limit.release()

    async def _fill_from_local(
        self,
        partials: dict[str, PartialFile],
        chunks_of: dict[str, list[tuple[int, ChunkRef]]],
        old_roots: Mapping[str, ContentHash],
        failed: dict[str, str],
        held: Mapping[str, set[int]],
    ) -> dict[ContentHash, tuple[ChunkRef, list[tuple[str, int]]]]:
        """Copy every chunk this node already holds anywhere (renames and copies cost no
        transfer) beside those ``held`` (path -> offsets) from an earlier attempt's temp
        files; returns the rest: chunk id -> (ref, [(path, offset), ...])."""
        covered = await self._copy_from_previous(partials, chunks_of, old_roots, failed, held)
        wanted: dict[ContentHash, tuple[ChunkRef, list[tuple[str, int]]]] = {}
        for path, leaves in chunks_of.items():
            if path not in partials:
                continue
            done = covered.get(path, set()) | held.get(path, set())
            for offset, ref in leaves:
                if offset not in done:
                    wanted.setdefault(ref.id, (ref, []))[1].append((path, offset))
        if not wanted:
            return {}

        def locate(index: IndexStore) -> dict[ContentHash, list[ChunkLocation]]:
            cids = list(wanted)
            located = index.locate_chunks(cids)
            return {cid: found for cid, found in zip(cids, located, strict=True) if found}

        def copy_local(located: dict[ContentHash, list[ChunkLocation]]) -> set[ContentHash]:
            copied: set[ContentHash] = set()
            with ChunkReader() as reader:
                for cid, locations in located.items():
                    data = reader.read_first_intact(cid, locations)
                    if data is None:
                        continue
                    for path, offset in wanted[cid][1]:
                        if path not in failed:
                            steps.write_or_fail(partials[path], offset, data, None, failed, path)
                    copied.add(cid)
            return copied

        # The index is held only to locate; reading and writing run beside other work.
        located = await self._index.run(locate, self._index.index)
        local = await in_thread(copy_local, located) if located else set()
        return {cid: item for cid, item in wanted.items() if cid not in local}

    async def _copy_from_previous(
        self,
        partials: dict[str, PartialFile],
        chunks_of: dict[str, list[tuple[int, ChunkRef]]],
        old_roots: Mapping[str, ContentHash],
        failed: dict[str, str],
        held: Mapping[str, set[int]],
    ) -> dict[str, set[int]]:
        """An edited file's unchanged runs come from its previous version on this disk, a
        run at a time (no per-chunk index lookup; PartialFile.copy_chunks verifies each
        chunk before writing it); returns the offsets done per path."""
        candidates = [path for path in partials if path in old_roots]
        if not candidates:
            return {}  # new paths (a join's): no scan index read
        scanned = await self.disk.scanned(candidates)
        roots: dict[str, ContentHash | None] = {p: old_roots[p] for p in candidates if p in scanned}
        if not roots:
            return {}
        previous = await self._index.run(steps.chunk_lists, self._index.index, roots)
        if not previous:
            return {}

        def copy_all() -> dict[str, set[int]]:
            return {
                path: steps.copy_from_previous(
                    self.path,
                    path,
                    partials[path],
                    packed,
                    [leaf for leaf in chunks_of.get(path, []) if leaf[0] not in held.get(path, ())],
                )
                for path, packed in previous.items()
                if path not in failed
            }

        return await in_thread(copy_all)

    async def _fill_from_peer(
        self,
        link: FolderLink,
        helpers: Callable[[], Sequence[Helper]],
        partials: dict[str, PartialFile],
        missing: dict[ContentHash, tuple[ChunkRef, list[tuple[str, int]]]],
        failed: dict[str, str],
        versions: Mapping[str, FileVersion],
        chunks_of: Mapping[str, list[tuple[int, ChunkRef]]],
        writer: MergedCalls[Callable[[], None]],
    ) -> None:
        """The chunks still missing, from ``link``'s member and, beside it, from the other
        members ``helpers()`` names (at the same root, or placing it). A helper whose batch
        fails its hash is dropped (as a member is) and the batch is asked again of the
        member."""
        batches = _batches_of(missing)

        def write_all(number: int, arrived: Arrived) -> None:
            # Every chunk verified before anything is written (a mismatch is the sender's
            # fault: IntegrityError), then written file by file: a new file whose every
            # chunk is in this batch in one step (steps.write_parts).
            batch = batches[number]
            per_path: dict[str, list[tuple[int, bytes | memoryview]]] = {}
            for position, data in arrived:
                ref, places = batch[position]
                steps.verify_chunk(ref, data)
                for path, offset in places:
                    per_path.setdefault(path, []).append((offset, data))
            for path, parts in per_path.items():
                if path not in failed:
                    whole = len(parts) == len(chunks_of.get(path, ()))
                    version = versions[path] if whole else None
                    steps.write_parts(partials[path], parts, version, failed, path)

        def refused(number: int, exc: PeerRequestError) -> None:
            # Content it has not got (any more): these files are retried later.
            logger.info("folder %s: %s", self.path, exc)
            failed.update(
                (path, "") for _ref, places in batches[number] for path, _offset in places
            )

        async def take(asked: list[int], helping: Callable[[], Sequence[Helper]]) -> list[int]:
            """One round over ``asked`` (``helping``: the helpers it may use); returns the
            batches a helper sent corrupt."""
            again: list[int] = []
            writers = trio.Semaphore(WRITES_IN_FLIGHT)
            async with trio.open_nursery() as nursery:

                async def write(position: int, arrived: Arrived, source: FolderLink) -> None:
                    # Written beside the transfer: the stream goes on reading meanwhile (a
                    # batch of small files is many creates, long enough to stall a stream).
                    number = asked[position]
                    await writers.acquire()
                    self.on_received(sum(len(data) for _position, data in arrived))

                    async def run() -> None:
                        # The step closes its files once this returns: a write the writer's
                        # thread is running is waited for even when cancelled (MergedCalls).
                        try:
                            await writer.call(functools.partial(write_all, number, arrived))
                            self._note_placed(batches[number], partials, failed, helpers)
                        except IntegrityError as exc:
                            if source.peer_id == link.peer_id:
                                raise
                            if not source.conn.is_closed:  # one drop for its batches
                                refuse(source.conn, f"folder {self.path}: {exc}")
                            again.append(number)
                        finally:
                            writers.release()

                    nursery.start_soon(run)

                await link.chunk_batches(
                    [[ref for ref, _places in batches[number]] for number in asked],
                    write,
                    lambda position, exc: refused(asked[position], exc),
                    helping,
                )
            return sorted(again)

        again = await take(list(range(len(batches))), helpers) if batches else []
        if again:
            await take(again, tuple)

    def _note_placed(
        self,
        batch: list[tuple[ChunkRef, list[tuple[str, int]]]],
        partials: dict[str, PartialFile],
        failed: dict[str, str],
        helpers: Callable[[], Sequence[Helper]],
    ) -> None:
        """A batch is written: its chunks can be served to members placing the same root
        (from the first file each went to), told of while any such member is linked (a
        join of 200k files with no one beside it would otherwise hold an entry a chunk)."""
        if not any(helper.placing_only() for helper in helpers()):
            return
        self.placing.add(
            (ref.id, partials[places[0][0]], places[0][1])
            for ref, places in batch
            if places and places[0][0] not in failed
        )

    async def _record_placed(
        self,
        placed: dict[str, os.stat_result],
        versions: dict[str, FileVersion],
        chunks_of: dict[str, list[tuple[int, ChunkRef]]],
        packed_chunks: dict[str, bytes] | None = None,
    ) -> None:
        """What we placed is known content: index it now (no re-read by the next scan, and
        other members can fetch its chunks from us at once). Its row is also its state as
        placed (:attr:`DiskView.scanned`): a later download or delete there checks it."""
        files = []
        for path, st in placed.items():
            version = versions[path]
            assert version.root is not None
            packed = (packed_chunks or {}).get(path)
            if packed is None:
                packed = b"".join(
                    CHUNK_RECORD.pack(ref.id, ref.length)
                    for _offset, ref in chunks_of.get(path, [])
                )
            files.append(
                PlacedFile(
                    path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode, version.root, packed
                )
            )
        await self._index.run(record_placed_files, self._index.index, self.path, files)


def _batches_of(
    missing: dict[ContentHash, tuple[ChunkRef, list[tuple[str, int]]]],
) -> list[list[tuple[ChunkRef, list[tuple[str, int]]]]]:
    """The chunks in request batches: at most MAX_BATCH, about CHUNK_BATCH_BYTES each."""
    batches: list[list[tuple[ChunkRef, list[tuple[str, int]]]]] = []
    current: list[tuple[ChunkRef, list[tuple[str, int]]]] = []
    size = 0
    for ref, places in missing.values():
        current.append((ref, places))
        size += ref.length
        if len(current) >= MAX_BATCH or size >= CHUNK_BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def _run_writes(writes: list[Callable[[], None]]) -> list[Exception | None]:
    """Each answered batch's writes on their own: a chunk that fails its hash fails its
    batch (the member is to blame, IntegrityError); disk errors fail single files inside.
    Any error goes back to its own batch's step, raised there: the writer itself never
    fails, so no step waits on a writer that is gone."""
    errors: list[Exception | None] = []
    for write in writes:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - handed to the batch's caller, raised there
            errors.append(exc)
        else:
            errors.append(None)
    return errors
