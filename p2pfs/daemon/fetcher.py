"""Fetching a share from a peer into a destination: manifest, trees, then chunks.

Order of work, each step verified before the next trusts it:
1. the manifest, checked against the root the ticket carries;
2. the directory trees, level by level, batched across directories (one request per batch);
3. files in windows: their chunk trees (batched), then each chunk from the first place that
   has it: an intact chunk left in the temp file by an interrupted fetch, any file this node
   has indexed (dedup: moves and copies cost nothing), else the peer, pipelined over several
   streams. Every chunk is hashed before it is written; a file is renamed into place only
   once complete and durable (store/assemble.py).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from p2pfs.content.chunking import Chunker, ChunkRef, StreamCutter, chunk_id
from p2pfs.content.folder import DIR_TREE, FILE_TREE, DirEntry, EntryKind, Manifest, manifest_root
from p2pfs.content.tree import TreeBuilder
from p2pfs.errors import IntegrityError, RemoteProtocolError, StorageError
from p2pfs.ids import ContentHash, short_hex
from p2pfs.net import PeerConnection
from p2pfs.store.assemble import Finished, PartialFile, commit_files
from p2pfs.store.index import ChunkLocation, IndexStore, read_chunk
from p2pfs.wire.messages import ChunkData, ErrorReply, GetChunks

from .ratelimit import TokenBucket, throttle
from .requests import PeerRequestError, RequestStream
from .service import TransferCounters
from .storage import AsyncIndex, in_thread
from .treewalk import TreeJob, walk_trees

logger = logging.getLogger(__name__)

WINDOW_BYTES = 2 << 30
WINDOW_FILES = 8192
"""Files whose chunk lists are held at once: bounds memory for any share size."""
REQUEST_CHUNKS = 64
REQUEST_BYTES = 4 << 20
STREAMS = 4
PIPELINE_DEPTH = 2
"""Requests in flight per stream: the next one is already queued when one finishes."""
COMMIT_FILES = 512
COMMIT_BYTES = 256 << 20
"""Finished files wait for a batch this big (or the end of a window) to be made durable."""
STALL_TIMEOUT = 10.0
"""A peer that sends nothing for this long while we wait on it has failed."""
FRAME_OVERHEAD = 16
"""Approximate framing bytes of one ChunkData (length, tag, fields), for the counters."""


class PeerStalledError(RemoteProtocolError):
    """The peer stopped answering while requests were outstanding."""


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
    bytes_local: int = 0
    """Copied from files this node already had (dedup)."""
    bytes_resumed: int = 0
    """Already in temp files left by an interrupted fetch."""
    bytes_present: int = 0
    """Files already complete at the destination."""
    seconds: float = 0.0


@dataclass(slots=True)
class _FileTask:
    rel: str
    path: str
    entry: DirEntry
    leaves: list[tuple[int, ChunkRef]] = field(default_factory=list)
    partial: PartialFile | None = None
    remaining: int = 0


Progress = Callable[[FetchProgress], None]


class Fetcher:
    def __init__(
        self,
        conn: PeerConnection,
        share_root: ContentHash,
        destination: str,
        index: AsyncIndex,
        counters: TransferCounters,
        progress: Progress | None = None,
        download_limit: TokenBucket | None = None,
    ) -> None:
        self._conn = conn
        self._download_limit = download_limit
        self._root = share_root
        self._destination = os.path.abspath(destination)
        self._index = index
        self._counters = counters
        self._progress = progress
        self._done_bytes = 0
        self._done_files = 0
        self._total_bytes = 0
        self._total_files = 0
        self._uncommitted: list[_FileTask] = []
        self._uncommitted_bytes = 0
        self.report = FetchReport(short_hex(share_root, 64), "", self._destination)

    async def run(self) -> FetchReport:
        started = time.monotonic()
        control = await RequestStream.open(self._conn, self._counters)
        manifest = await self._manifest(control)
        self._total_bytes = manifest.tree.size
        self._total_files = manifest.file_count
        self.report.name = manifest.name
        top_dir, rename_single = self._layout(manifest)
        files = await self._walk_directories(control, manifest, top_dir, rename_single)
        window: list[_FileTask] = []
        window_bytes = 0
        for task in files:
            window.append(task)
            window_bytes += task.entry.size
            if window_bytes >= WINDOW_BYTES or len(window) >= WINDOW_FILES:
                await self._fetch_window(control, window)
                window, window_bytes = [], 0
        if window:
            await self._fetch_window(control, window)
        await control.close()
        self.report.files = len(files)
        self.report.bytes = manifest.tree.size
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- manifest and layout --------------------------------------------------------------

    async def _manifest(self, control: RequestStream) -> Manifest:
        encoded = await control.manifest(self._root)
        if manifest_root(encoded) != self._root:
            raise IntegrityError("the peer's manifest does not match the ticket's root")
        return Manifest.decode_untrusted(encoded)

    def _layout(self, manifest: Manifest) -> tuple[str, str | None]:
        """Where the top directory goes; for a single file, the name it is written as."""
        if not manifest.single_file:
            _make_directory(self._destination)
            return self._destination, None
        if os.path.isdir(self._destination):
            return self._destination, None
        parent = os.path.dirname(self._destination)
        _make_directory(parent)
        return parent, os.path.basename(self._destination)

    async def _walk_directories(
        self,
        control: RequestStream,
        manifest: Manifest,
        top_dir: str,
        rename_single: str | None,
    ) -> list[_FileTask]:
        async def fetch(hashes: list[ContentHash]) -> list[bytes]:
            return await control.nodes(self._root, hashes)

        files: list[_FileTask] = []
        level: list[TreeJob[DirEntry]] = [TreeJob(DIR_TREE, manifest.tree, tag=("", top_dir))]
        while level:
            await walk_trees(level, fetch)
            next_level: list[TreeJob[DirEntry]] = []
            for job in level:
                rel_prefix, disk_dir = job.tag
                if manifest.single_file and not rel_prefix:
                    _check_single_file(manifest, job.leaves)
                for _offset, entry in job.leaves:
                    rel = f"{rel_prefix}{entry.name}"
                    name = rename_single if rename_single and not rel_prefix else entry.name
                    path = os.path.join(disk_dir, name)
                    if entry.kind is EntryKind.DIRECTORY:
                        await in_thread(_make_directory, path)
                        self.report.directories += 1
                        next_level.append(TreeJob(DIR_TREE, entry.root, tag=(f"{rel}/", path)))
                    else:
                        files.append(_FileTask(rel, path, entry))
            level = next_level
        return files

    # -- files ----------------------------------------------------------------------------

    async def _fetch_window(self, control: RequestStream, window: list[_FileTask]) -> None:
        complete = await in_thread(_already_complete_all, window)
        pending: list[_FileTask] = []
        for task, done in zip(window, complete, strict=True):
            if done:
                self.report.bytes_present += task.entry.size
                self._file_done(task.entry.size)
            else:
                pending.append(task)
        jobs = [TreeJob(FILE_TREE, task.entry.root, tag=task) for task in pending]

        async def fetch(hashes: list[ContentHash]) -> list[bytes]:
            return await control.nodes(self._root, hashes)

        await walk_trees(jobs, fetch)
        for job in jobs:
            job.tag.leaves = job.leaves
        resumed = await in_thread(_open_partials, pending)
        wanted: dict[ContentHash, ChunkRef] = {}
        placements: dict[ContentHash, list[tuple[_FileTask, int]]] = {}
        finished: list[_FileTask] = []
        for task, present in zip(pending, resumed, strict=True):
            for offset, ref in task.leaves:
                if offset in present:
                    self.report.bytes_resumed += ref.length
                    self._done_bytes += ref.length
                    continue
                task.remaining += 1
                wanted.setdefault(ref.id, ref)
                placements.setdefault(ref.id, []).append((task, offset))
            if task.remaining == 0:
                finished.append(task)
        await self._commit(finished)
        missing = await self._copy_local(list(wanted.values()), placements)
        if missing:
            await self._fetch_from_peer(missing, placements)
        await self._commit(self._uncommitted)
        unfinished = [task.rel for task in pending if task.remaining]
        if unfinished:
            raise RemoteProtocolError(f"{len(unfinished)} files incomplete, e.g. {unfinished[0]}")

    async def _copy_local(
        self,
        wanted: list[ChunkRef],
        placements: dict[ContentHash, list[tuple[_FileTask, int]]],
    ) -> list[ChunkRef]:
        """Write every wanted chunk this node already holds; return the rest."""
        located = await self._index.run(_locate_each, self._index.index, wanted)
        candidates = [(ref, where) for ref, where in zip(wanted, located, strict=True) if where]
        missing = [ref for ref, where in zip(wanted, located, strict=True) if not where]
        for start in range(0, len(candidates), REQUEST_CHUNKS):
            group = candidates[start : start + REQUEST_CHUNKS]
            datas = await in_thread(_read_local, group)
            arrived = []
            for (ref, _where), data in zip(group, datas, strict=True):
                if data is None:
                    missing.append(ref)
                else:
                    self.report.bytes_local += ref.length * len(placements[ref.id])
                    arrived.append((ref, data))
            await self._place(arrived, placements)
        return missing

    async def _fetch_from_peer(
        self,
        missing: list[ChunkRef],
        placements: dict[ContentHash, list[tuple[_FileTask, int]]],
    ) -> None:
        batches: list[tuple[ChunkRef, ...]] = []
        current: list[ChunkRef] = []
        current_bytes = 0
        for ref in missing:
            if current and (len(current) >= REQUEST_CHUNKS or current_bytes >= REQUEST_BYTES):
                batches.append(tuple(current))
                current, current_bytes = [], 0
            current.append(ref)
            current_bytes += ref.length
        if current:
            batches.append(tuple(current))
        send_batches, receive_batches = trio.open_memory_channel[tuple[ChunkRef, ...]](len(batches))
        for batch in batches:
            send_batches.send_nowait(batch)
        send_batches.close()
        async with trio.open_nursery() as nursery:
            for _ in range(min(STREAMS, len(batches))):
                nursery.start_soon(self._stream_worker, receive_batches.clone(), placements)
        await receive_batches.aclose()

    async def _stream_worker(
        self,
        batches: trio.MemoryReceiveChannel[tuple[ChunkRef, ...]],
        placements: dict[ContentHash, list[tuple[_FileTask, int]]],
    ) -> None:
        """One stream: a sender keeps PIPELINE_DEPTH requests in flight, replies come in order."""
        stream = await RequestStream.open(self._conn, self._counters)
        slots = trio.Semaphore(PIPELINE_DEPTH)
        sent_send, sent_receive = trio.open_memory_channel[tuple[ChunkRef, ...]](PIPELINE_DEPTH)

        async def sender() -> None:
            async with batches, sent_send:
                async for batch in batches:
                    await slots.acquire()
                    await stream.send(GetChunks(stream.new_request_id(), self._root, batch))
                    await sent_send.send(batch)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            async with sent_receive:
                async for batch in sent_receive:
                    await self._receive_batch(stream, batch, placements)
                    slots.release()
        await stream.close()

    async def _receive_batch(
        self,
        stream: RequestStream,
        batch: tuple[ChunkRef, ...],
        placements: dict[ContentHash, list[tuple[_FileTask, int]]],
    ) -> None:
        """Read one request's chunks, then verify and write them in one worker-thread call."""
        arrived: list[tuple[ChunkRef, bytes]] = []
        for ref in batch:
            with trio.move_on_after(STALL_TIMEOUT) as stalled:
                reply = await stream.next_reply()
            if stalled.cancelled_caught:
                raise PeerStalledError(
                    f"peer {self._conn.peer_id.short()} sent nothing for {STALL_TIMEOUT:.0f} s"
                )
            if isinstance(reply, ErrorReply):
                raise PeerRequestError(reply.code, reply.message)
            assert isinstance(reply, ChunkData)  # the session checked order and length
            self._counters.payload_received += len(reply.payload)
            self._counters.protocol_received += FRAME_OVERHEAD
            # Waiting here stops reading the stream, so flow control slows the sender.
            await throttle(self._download_limit, len(reply.payload))
            arrived.append((ref, bytes(reply.payload)))
        try:
            await self._place(arrived, placements)
        except IntegrityError as exc:
            self._counters.integrity_failures += 1
            raise IntegrityError(
                f"peer {self._conn.peer_id.short()} sent a chunk that fails its hash"
            ) from exc
        self.report.bytes_from_peer += sum(ref.length for ref, _data in arrived)

    async def _place(
        self,
        arrived: list[tuple[ChunkRef, bytes]],
        placements: dict[ContentHash, list[tuple[_FileTask, int]]],
    ) -> None:
        """Verify chunks and write each wherever it goes; finished files are committed in
        batches (one sync for many files)."""
        if not arrived:
            return
        writes = [(ref, data, placements.get(ref.id, [])) for ref, data in arrived]
        await in_thread(_write_all, writes)
        for ref, _data, targets in writes:
            placements.pop(ref.id, None)
            for task, _offset in targets:
                self._done_bytes += ref.length
                task.remaining -= 1
                if task.remaining == 0:
                    self._uncommitted.append(task)
                    self._uncommitted_bytes += task.entry.size
        if len(self._uncommitted) >= COMMIT_FILES or self._uncommitted_bytes >= COMMIT_BYTES:
            await self._commit(self._uncommitted)
        self._report_progress()

    async def _commit(self, tasks: list[_FileTask]) -> None:
        if not tasks:
            return
        batch = list(tasks)
        if tasks is self._uncommitted:
            self._uncommitted = []
            self._uncommitted_bytes = 0
        finished = [Finished(task.partial, task.entry.executable) for task in batch]  # type: ignore[arg-type]
        await in_thread(commit_files, finished)
        for _task in batch:
            self._file_done(0)

    def _file_done(self, extra_bytes: int) -> None:
        self._done_files += 1
        self._done_bytes += extra_bytes
        self._report_progress()

    def _report_progress(self) -> None:
        if self._progress is not None:
            self._progress(
                FetchProgress(
                    self._done_bytes, self._total_bytes, self._done_files, self._total_files
                )
            )


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


def _already_complete_all(tasks: list[_FileTask]) -> list[bool]:
    return [_already_complete(task) for task in tasks]


def _already_complete(task: _FileTask) -> bool:
    """True if the destination already holds exactly this file (an earlier fetch finished it)."""
    try:
        info = os.lstat(task.path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != task.entry.size:
        return False
    if task.entry.size:
        builder = TreeBuilder(FILE_TREE)
        cutter = StreamCutter(Chunker())
        with open(task.path, "rb") as handle:
            while block := handle.read(4 << 20):
                builder.extend(ChunkRef(chunk_id(view), len(view)) for view in cutter.feed(block))
        builder.extend(ChunkRef(chunk_id(view), len(view)) for view in cutter.finish())
        if builder.finish() != task.entry.root:
            return False
    _set_executable(task.path, task.entry.executable)
    return True


def _open_partials(tasks: list[_FileTask]) -> list[set[int]]:
    """A PartialFile per task, and the offsets of chunks an earlier attempt left intact."""
    present = []
    for task in tasks:
        task.partial = PartialFile(
            os.path.dirname(task.path),
            os.path.basename(task.path),
            task.entry.hash,
            task.entry.size,
        )
        present.append(task.partial.verified_chunks(task.leaves))
        task.partial.close()
    return present


def _locate_each(index: IndexStore, wanted: list[ChunkRef]) -> list[list[ChunkLocation]]:
    return [index.locate_chunk(ref.id) for ref in wanted]


def _read_local(group: list[tuple[ChunkRef, list[ChunkLocation]]]) -> list[bytes | None]:
    """Each chunk from the first local file that still holds it (hash-checked), or None."""
    out: list[bytes | None] = []
    for ref, locations in group:
        data = None
        for location in locations:
            try:
                data = read_chunk(location, ref.id)
                break
            except (IntegrityError, StorageError):
                continue
        out.append(data)
    return out


def _write_all(writes: list[tuple[ChunkRef, bytes, list[tuple[_FileTask, int]]]]) -> None:
    """Verify every chunk first, then write: nothing is written if any chunk is bad.

    A file whose last chunks these are has its descriptor closed at once, so open files stay
    few however many small files a batch completes.
    """
    for ref, data, _targets in writes:
        if len(data) != ref.length or chunk_id(data) != ref.id:
            raise IntegrityError(f"chunk {short_hex(ref.id)} fails its hash")
    written: dict[int, int] = {}
    for _ref, data, targets in writes:
        for task, offset in targets:
            assert task.partial is not None
            task.partial.write_verified(offset, data)
            written[id(task)] = written.get(id(task), 0) + 1
            if written[id(task)] == task.remaining:
                task.partial.close()


def _set_executable(path: str, executable: bool) -> None:
    mode = os.stat(path).st_mode
    wanted = mode | 0o111 if executable else mode & ~0o111
    if wanted != mode:
        os.chmod(path, wanted & 0o7777)
