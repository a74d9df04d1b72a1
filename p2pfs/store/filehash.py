"""Reading and hashing one file for the scanner: a small file in one read, a big one
streamed in blocks through a two-thread pipeline (cut here, hash there: FastCDC and BLAKE3
both release the GIL), so a big file is never held whole. A file that changes while read
raises :class:`FileChanged`; the scanner decides whether to read it again.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import blake3

from p2pfs.content.chunking import Chunker, ChunkRef, chunk_id
from p2pfs.content.folder import FILE_TREE
from p2pfs.content.rechunk import Rechunker
from p2pfs.content.tree import LeafNode
from p2pfs.ids import ContentHash
from p2pfs.store.index import CHUNK_RECORD, build_file_tree, signed64

BLOCK_SIZE = 4 << 20
"""Files up to this size are read with one ``os.read``; larger ones stream in such blocks."""
PIPELINE_BUFFERS = 3
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# Non-blocking so that a file swapped for a fifo between stat and open cannot hang us.
OPEN_FLAGS |= getattr(os, "O_NONBLOCK", 0)


class FileChanged(Exception):
    """The file's stat moved while it was read; read it again."""


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What must not move while a file is read (ctime catches a restored mtime)."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass(slots=True)
class Hashed:
    """A file as read: its stat when read and its content's root and chunk list."""

    size: int
    mtime_ns: int
    inode: int
    mode: int
    root: bytes
    chunks: bytes
    settled_ctime_ns: int | None = None
    """The file's ctime when read, if it was settled then (:func:`settled_ctime`)."""


SETTLED_FINE_NS = 50_000_000
"""How much older than a read a ctime must be to be settled on a file system that keeps
sub-second times: comfortably more than the kernel's timestamp tick (a jiffy, 1-10 ms)."""

SETTLED_COARSE_NS = 2_000_000_000
"""The same where the times are whole seconds (or FAT's 2 s): any file system's tick."""


def settled_ctime(ctime_ns: int, mtime_ns: int, read_started_ns: int) -> int | None:
    """``ctime_ns`` if every write after ``read_started_ns`` must change it, else None.

    A write marks the inode changed before it touches the bytes, and the new ctime is the
    kernel's coarse clock at that moment: later than this ctime as long as the ctime is
    older than the read by more than one tick. Times with no sub-second part are taken
    to be from a coarse file system (a fine one gives that once in 10^9 files: harmless).
    Used so that a server may trust the row of a file whose stat has not moved since
    (store/index.py ChunkReader), as a scan already trusts it for the content's hash.
    """
    fine = ctime_ns % 1_000_000_000 and mtime_ns % 1_000_000_000
    limit = read_started_ns - (SETTLED_FINE_NS if fine else SETTLED_COARSE_NS)
    return ctime_ns if ctime_ns < limit and mtime_ns < limit else None


def hash_file_once(
    path: str,
    chunker: Chunker,
    count_read: Callable[[int], None],
    count_small: Callable[[int], None],
    read_hook: Callable[[str], None] | None = None,
    previous: bytes | None = None,
) -> Hashed:
    """Read and hash a regular file, never following a symlink; raises FileChanged if its
    stat moved while it was read (read it again) and OSError if it cannot be read.

    ``count_read`` hears every block of a big file as it is read (progress), ``count_small``
    the one read of a small file. ``previous``: the packed chunk list the path had before;
    a big file is then re-cut only around what changed (content/rechunk.py).
    """
    read_started_ns = time.time_ns()
    fd = os.open(path, OPEN_FLAGS)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise FileChanged
        if before.st_size <= BLOCK_SIZE:
            packed = hash_small(fd, before.st_size, chunker, count_small)
        elif previous:
            packed = rechunk_file(fd, chunker, previous, count_read)
        else:
            packed = Pipeline(chunker, count_read).run(fd)
        if read_hook is not None:
            read_hook(path)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if identity(before) != identity(after):
        raise FileChanged
    size = sum(length for _, length in CHUNK_RECORD.iter_unpack(packed))
    if size != before.st_size:
        raise FileChanged
    if len(packed) == CHUNK_RECORD.size:  # one chunk: the root is one leaf node
        cid, length = CHUNK_RECORD.unpack(packed)
        leaf = FILE_TREE.encode(LeafNode((ChunkRef(ContentHash(cid), length),)))
        root = FILE_TREE.node_hash(leaf)
    else:
        root = build_file_tree(packed).hash
    return Hashed(
        size=size,
        mtime_ns=before.st_mtime_ns,
        inode=signed64(before.st_ino),
        mode=before.st_mode,
        root=root,
        chunks=packed,
        settled_ctime_ns=settled_ctime(before.st_ctime_ns, before.st_mtime_ns, read_started_ns),
    )


def hash_small(fd: int, size: int, chunker: Chunker, count: Callable[[int], None]) -> bytes:
    """The packed chunk list of a file of ``size`` bytes (at most BLOCK_SIZE), read at once."""
    # One read of size + 1 bytes: a file that grew shows it by the extra byte (and by
    # its stat afterwards); short reads only happen near EOF or on odd file systems.
    data = os.read(fd, size + 1)
    while len(data) < size:
        more = os.read(fd, size + 1 - len(data))
        if not more:
            break
        data += more
    count(len(data))
    if len(data) != size:
        raise FileChanged
    if not data:
        return b""
    if size <= chunker.params.min_size:  # FastCDC never cuts below min_size
        return CHUNK_RECORD.pack(chunk_id(data), size)
    return b"".join(CHUNK_RECORD.pack(ref.id, ref.length) for ref in chunker.chunk_refs(data))


def rechunk_file(
    fd: int,
    chunker: Chunker,
    previous: bytes,
    count_read: Callable[[int], None],
    block_size: int = BLOCK_SIZE,
) -> bytes:
    """The packed chunk list of everything ``fd`` reads until EOF, FastCDC running only
    where the bytes differ from the ``previous`` chunk list (each chunk is hashed once, as
    in the pipeline; the cutting, the pipeline's other half, mostly disappears).

    One buffer, read into and hashed in place: fresh 4 MiB reads (a page fault per 4 KiB)
    and joining each block to the uncut tail were ~0.1 s of a 256 MiB file's ~0.14 s."""
    old = [ChunkRef(ContentHash(cid), length) for cid, length in CHUNK_RECORD.iter_unpack(previous)]
    rechunker = Rechunker(chunker, old)
    largest = max([chunker.params.max_size, *(ref.length for ref in old)])
    buffer = bytearray(block_size + 2 * largest)  # what a scan keeps: two chunks at most
    packed: list[bytes] = []
    filled = 0
    eof = False
    with memoryview(buffer) as view:
        while not eof:
            while filled < len(buffer):
                count = os.readv(fd, [view[filled:]])
                if not count:
                    eof = True
                    break
                count_read(count)
                filled += count
            chunks, kept = rechunker.scan(view[:filled], final=eof)
            packed.extend(CHUNK_RECORD.pack(ref.id, ref.length) for ref in chunks)
            assert kept or eof or filled < len(buffer), "a scan keeps two chunks at most"
            view[: filled - kept] = view[kept:filled]
            filled -= kept
    return b"".join(packed)


class Pipeline:
    """Chunk and hash one file in blocks: cut in the calling thread, hash in another.

    Blocks live in a few recycled buffers, each holding the uncut tail of the previous block
    (less than ``max_size``) followed by up to BLOCK_SIZE new bytes. A cut is final once
    ``max_size`` bytes follow the chunk's start, exactly as
    :class:`~p2pfs.content.chunking.StreamCutter` decides, but without copying each block.
    """

    def __init__(self, chunker: Chunker, count_read: Callable[[int], None]) -> None:
        self.chunker = chunker
        self.count_read = count_read
        self.max_size = chunker.params.max_size
        self.capacity = BLOCK_SIZE + self.max_size
        self.free: queue.Queue[bytearray] = queue.Queue()
        self.work: queue.Queue[tuple[bytearray, list[int]] | None] = queue.Queue()
        self.packed: list[bytes] = []
        self.failure: list[BaseException] = []

    def run(self, fd: int) -> bytes:
        """The packed chunk list of everything ``fd`` reads until EOF."""
        for _ in range(PIPELINE_BUFFERS):
            self.free.put(bytearray(self.capacity))
        thread = threading.Thread(target=self._hash_blocks, name="p2pfs-hash", daemon=True)
        thread.start()
        try:
            self._cut_blocks(fd)
        finally:
            self.work.put(None)
            thread.join()
        if self.failure:
            raise self.failure[0]
        return b"".join(self.packed)

    def _cut_blocks(self, fd: int) -> None:
        buffer = self.free.get()
        filled = 0
        eof = False
        while not eof and not self.failure:
            with memoryview(buffer) as view:
                while filled < self.capacity:
                    count = os.readv(fd, [view[filled:]])
                    if not count:
                        eof = True
                        break
                    self.count_read(count)
                    filled += count
                lengths: list[int] = []
                start = 0
                for piece in self.chunker.cut(view[:filled]):
                    if not eof and filled - start < self.max_size:
                        break
                    lengths.append(len(piece))
                    start += len(piece)
            if eof:
                self.work.put((buffer, lengths))
                return
            following = self.free.get()
            carry = filled - start
            following[:carry] = buffer[start:filled]
            self.work.put((buffer, lengths))
            buffer, filled = following, carry

    def _hash_blocks(self) -> None:
        try:
            while (item := self.work.get()) is not None:
                buffer, lengths = item
                with memoryview(buffer) as view:
                    offset = 0
                    for length in lengths:
                        digest = blake3.blake3(view[offset : offset + length]).digest()
                        self.packed.append(CHUNK_RECORD.pack(digest, length))
                        offset += length
                self.free.put(buffer)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the calling thread)
            self.failure.append(exc)
            self.free.put(bytearray(self.capacity))  # never leave the cutter waiting
