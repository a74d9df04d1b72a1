"""The scanner: walks a file or folder, hashes what changed, stores trees in the index.

The walk is post-order: a directory's files are hashed (or reused from the index when their
(size, mtime_ns, inode, mode) still match), then its subdirectories, then its own tree is
built. Only one directory's entries per level of depth are in memory, and a big file is
streamed in blocks through a two-thread pipeline (cut here, hash there: FastCDC and BLAKE3
both release the GIL), so neither a big tree nor a big file is ever held whole.

Bad input never stops a scan: symlinks (never followed), special files, names that are not
UTF-8 or collide after NFC, permission errors, files vanishing or changing while read all
become :class:`Problem` entries naming the path, and the share is built from the rest.
Every index write happens in a transaction, so an interrupted scan leaves a consistent index.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import blake3

from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker, ChunkRef, chunk_id
from p2pfs.content.folder import (
    DIR_TREE,
    FILE_TREE,
    FLAG_EXECUTABLE,
    DirEntry,
    EntryKind,
    Manifest,
    build_directory,
    default_manifest,
)
from p2pfs.content.names import (
    MAX_NAME_BYTES,
    MAX_PATH_DEPTH,
    name_sort_key,
    normalize_local_name,
)
from p2pfs.content.tree import Child, LeafNode, TreeBuilder
from p2pfs.errors import InvalidNameError, LocalProtocolError, StorageError
from p2pfs.ids import ContentHash
from p2pfs.store.assemble import is_partial_name
from p2pfs.store.index import CHUNK_RECORD, FileRow, IndexStore, NewFile, build_file_tree

STATE_DIR_NAME = ".p2pfs"
"""A sync folder's own state directory (compared case-folded: on a file system that
ignores case, `.P2PFS` is the same directory)."""

log = logging.getLogger(__name__)

RACY_WINDOW_NS = 2_000_000_000
"""A file whose mtime is this close to (or after) the last scan's start may have changed
within the same timestamp tick after it was read (FAT has 2 s ticks), so its cached row is
not trusted: the file is read again, as git does for racily clean entries."""
BLOCK_SIZE = 4 << 20
"""Files up to this size are read with one ``os.read``; larger ones stream in such blocks."""
READ_ATTEMPTS = 3
"""A file that changes while read is retried this many times, then reported."""
_PIPELINE_BUFFERS = 3
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# Non-blocking so that a file swapped for a fifo between stat and open cannot hang us.
_OPEN_FLAGS |= getattr(os, "O_NONBLOCK", 0)
_COMMIT_ROWS = 20_000
_COMMIT_BYTES = 256 << 20
_COMMIT_SECONDS = 2.0

Progress = Callable[[int, int], None]
"""Called with (bytes done, files done) so far, cumulative."""
ReadHook = Callable[[str], None]
"""Test seam: called with a file's path after its bytes were read, before it is re-checked."""
IgnoreRule = Callable[[str, bool], bool]
"""``(relative path, is_directory) -> leave it out``."""


@dataclass(frozen=True, slots=True)
class Problem:
    """A path the scan skipped, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(slots=True)
class ScanStats:
    """What the scan cost: a rescan of an unchanged tree hashes nothing and reads 0 bytes."""

    files_hashed: int = 0
    bytes_read: int = 0
    files_reused: int = 0
    files_renamed: int = 0
    """Files found under a new name whose content the index knew (not read again)."""


@dataclass(frozen=True, slots=True)
class ScanResult:
    share_id: int
    manifest: Manifest
    root: ContentHash
    files: int
    bytes: int
    chunks: int
    directories: int
    problems: list[Problem]
    stats: ScanStats
    ignored: list[str] = field(default_factory=list)
    """Files and directories the ignore rule left out (rel paths; nothing below them)."""


class _FileChanged(Exception):
    """The file's stat moved while it was read; read it again."""


class _TargetMoved(Exception):
    """A directory a partial scan was to list is gone or not a directory any more."""


@dataclass(slots=True)
class PartScan:
    """What a partial scan (:func:`scan_directories`) saw: its scope and what is in it."""

    files: list[tuple[str, bytes, int, int, int, int]] = field(default_factory=list)
    """(path, root, size, mtime_ns, inode, mode) of every file in scope."""
    directories: list[str] = field(default_factory=list)
    """Subdirectories in scope (rel paths)."""
    shallow: list[str] = field(default_factory=list)
    """Directories whose own entries were rescanned: their direct children are in scope."""
    deep: list[str] = field(default_factory=list)
    """Directories scanned whole (new) or dropped (gone): everything below is in scope."""
    problems: list[Problem] = field(default_factory=list)
    stats: ScanStats = field(default_factory=ScanStats)
    ignored: list[str] = field(default_factory=list)
    """Files and directories in scope the ignore rule left out (rel paths)."""


def _display(path: str) -> str:
    """A printable form of a path whose bytes may not be UTF-8."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _signed64(value: int) -> int:
    # SQLite integers are signed; some file systems hand out inode numbers >= 2**63.
    return value - (1 << 64) if value >= 1 << 63 else value


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What must not move while a file is read (ctime catches a restored mtime)."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass(slots=True)
class _Hashed:
    size: int
    mtime_ns: int
    inode: int
    mode: int
    root: bytes
    chunks: bytes


@dataclass(slots=True)
class _DirResult:
    tree: Child
    files: int = 0
    directories: int = 0
    chunks: int = 0


_FileItem = tuple[str, int, int, bytes]
"""A file as its directory's tree lists it: (tree name, flags, size, root)."""


class _Scan:
    """One scan of one share; not reusable."""

    def __init__(
        self,
        index: IndexStore,
        share_id: int,
        generation: int,
        racy_limit_ns: int,
        chunker: Chunker,
        progress: Progress | None,
        read_hook: ReadHook | None,
        ignore: IgnoreRule | None = None,
    ) -> None:
        self.index = index
        self.ignore = ignore
        self.share_id = share_id
        self.generation = generation
        self.racy_limit_ns = racy_limit_ns
        self.chunker = chunker
        self.min_size = chunker.params.min_size
        self.progress = progress
        self.read_hook = read_hook
        self.stats = ScanStats()
        self.problems: list[Problem] = []
        self.ignored: list[str] = []
        """What the ignore rule left out: a sync folder on a file system that ignores case
        must not place a path over one of these names."""
        self.vanished: dict[tuple[int, int, int, int], tuple[bytes, bytes]] = {}
        self.done_files = 0
        self.done_bytes = 0
        self._adds: list[NewFile] = []
        self._in_transaction = False
        self._began = 0.0
        self._writes = 0
        self._hashed_since_commit = 0
        self.visited: list[tuple[int, str]] | None = None
        """(dir id, rel) of every directory a partial scan visited."""

    def remember_vanished(self, rows: list[FileRow]) -> None:
        """Rows about to be dropped: a later directory of this scan may hold the same file
        under a new name (a move between directories)."""
        for _file_id, size, mtime_ns, inode, mode, root, _count in rows:
            chunks = self.index.file_chunks(root)
            if chunks is not None:
                self.vanished[(inode, size, mtime_ns, mode)] = (root, chunks)

    def problem(self, path: str, reason: str) -> None:
        shown = _display(path)
        log.info("skipping %s: %s", shown, reason)
        self.problems.append(Problem(shown, reason))

    # -- writes share one transaction, committed every few thousand rows or seconds ----

    def write(self) -> IndexStore:
        """The index, inside the scan's open transaction (any point is safe to commit at)."""
        if not self._in_transaction:
            self.index.begin()
            self._in_transaction = True
            self._began = time.monotonic()
        self._writes += 1
        return self.index

    def add(self, file: NewFile) -> None:
        """Queue a new file; the batch is inserted with one statement before each commit."""
        self.write()
        self._adds.append(file)

    def maybe_commit(self, hashed_bytes: int = 0) -> None:
        self._hashed_since_commit += hashed_bytes
        if self._in_transaction and (
            self._writes >= _COMMIT_ROWS
            or self._hashed_since_commit >= _COMMIT_BYTES
            or time.monotonic() - self._began >= _COMMIT_SECONDS
        ):
            self.commit()

    def commit(self) -> None:
        if not self._in_transaction:
            return
        try:
            self.index.add_files(self._adds)
        except BaseException:
            self.rollback()
            raise
        self._adds = []
        self.index.commit()
        self._in_transaction = False
        self._writes = self._hashed_since_commit = 0

    def rollback(self) -> None:
        if self._in_transaction:
            self._adds = []
            self._in_transaction = False
            self.index.rollback()

    # -- the walk -------------------------------------------------------------------------

    def scan_dir(
        self, disk_path: str, rel: str, depth: int, parent_id: int | None
    ) -> _DirResult | None:
        """Scan one directory and everything below; None if it could not be listed."""
        if depth > MAX_PATH_DEPTH:
            self.problem(disk_path, f"deeper than {MAX_PATH_DEPTH} levels, skipped")
            return None
        try:
            with os.scandir(disk_path) as listing:
                entries = list(listing)
        except OSError as exc:
            self.problem(disk_path, f"cannot list directory: {exc.strerror or exc}")
            return None
        dir_id, cached_tree, cached_digest = self.write().visit_dir(
            self.share_id, disk_path, rel, parent_id
        )
        self.write().mark_dir(dir_id, rel, self.generation)
        if self.visited is not None:
            self.visited.append((dir_id, rel))
        files, subdirs = self._entries(disk_path, rel, entries)
        del entries

        result = _DirResult(Child(ContentHash(b""), 0))
        items, changed = self.scan_files(dir_id, disk_path, files, result)
        del files
        if self.progress is not None:
            self.progress(self.done_bytes, self.done_files)

        subtrees: list[tuple[str, Child]] = []
        for name, tree_name in subdirs:
            child_rel = f"{rel}/{tree_name}" if rel else tree_name
            sub = self.scan_dir(os.path.join(disk_path, name), child_rel, depth + 1, dir_id)
            if sub is not None:
                subtrees.append((tree_name, sub.tree))
                result.files += sub.files
                result.directories += sub.directories + 1
                result.chunks += sub.chunks
        digest = _subdirs_digest(subtrees)
        size = sum(item[2] for item in items) + sum(tree.size for _, tree in subtrees)
        if not changed and cached_tree is not None and cached_digest == digest:
            result.tree = Child(ContentHash(cached_tree), size)
        else:
            result.tree = self.store_directory(items, subtrees)
            self.write().set_dir_tree(dir_id, result.tree.hash, digest)
        self.maybe_commit()
        return result

    def _entries(
        self, disk_path: str, rel: str, entries: list[os.DirEntry[str]]
    ) -> tuple[list[tuple[str, str, os.stat_result]], list[tuple[str, str]]]:
        """A listing's shareable files (with lstat) and subdirectories, ignores applied."""
        files, subdirs = self._classify(entries)
        files, subdirs = self._drop_collisions(disk_path, files, subdirs)
        if self.ignore is not None:
            ignore, prefix = self.ignore, f"{rel}/" if rel else ""
            kept_files = [item for item in files if not ignore(prefix + item[1], False)]
            kept_dirs = [item for item in subdirs if not ignore(prefix + item[1], True)]
            if len(kept_files) != len(files) or len(kept_dirs) != len(subdirs):
                kept = {item[1] for item in kept_files} | {tree for _name, tree in kept_dirs}
                names = [item[1] for item in files] + [tree for _name, tree in subdirs]
                self.ignored += [prefix + name for name in names if name not in kept]
            files, subdirs = kept_files, kept_dirs
        return files, subdirs

    def scan_shallow(self, disk_path: str, rel: str, dir_id: int, part: PartScan) -> None:
        """Rescan one directory's own entries (a watcher named it): its files, new
        subdirectories whole, and subdirectories gone from disk dropped with all below."""
        try:
            with os.scandir(disk_path) as listing:
                entries = list(listing)
        except OSError as exc:
            raise _TargetMoved(disk_path) from exc
        files, subdirs = self._entries(disk_path, rel, entries)
        del entries
        assert self.visited is not None
        self.visited.append((dir_id, rel))
        self.scan_files(dir_id, disk_path, files, _DirResult(Child(ContentHash(b""), 0)))
        known = self.index.child_dirs(self.share_id, disk_path)
        depth = rel.count("/") + 1 if rel else 0
        for name, tree_name in subdirs:
            child_rel = f"{rel}/{tree_name}" if rel else tree_name
            child_disk = os.path.join(disk_path, name)
            part.directories.append(child_rel)
            if known.pop(child_disk, None) is None:  # new here: scanned whole
                self.scan_dir(child_disk, child_rel, depth + 1, dir_id)
                part.deep.append(child_rel)
        for child_disk, (_child_id, child_rel) in known.items():  # gone, or ignored now
            self.remember_vanished(self.write().forget_dir_tree(self.share_id, child_disk))
            self.write().invalidate_dir(dir_id)
            part.deep.append(child_rel)
        part.shallow.append(rel)
        self.maybe_commit()

    def _classify(
        self, entries: list[os.DirEntry[str]]
    ) -> tuple[list[tuple[str, str, os.stat_result]], list[tuple[str, str]]]:
        """Split a listing into regular files (with lstat) and subdirectories; report the rest."""
        files: list[tuple[str, str, os.stat_result]] = []
        subdirs: list[tuple[str, str]] = []
        for entry in entries:
            name = entry.name
            if name[0] == "." and (is_partial_name(name) or name.casefold() == STATE_DIR_NAME):
                # A download in progress, or a sync folder's state (its kept versions among
                # it) at any depth: never content of a share, even of a parent folder's.
                continue
            if name.isascii() and "\\" not in name and len(name) <= MAX_NAME_BYTES:
                # What normalize_local_name returns for an ASCII name a directory listed
                # (never empty, "." or "..", nor holding "/" or NUL), without its cost.
                tree_name = name
            else:
                try:
                    tree_name = normalize_local_name(name)
                except InvalidNameError as exc:
                    self.problem(entry.path, str(exc))
                    continue
            try:
                if entry.is_symlink():
                    self.problem(entry.path, "symbolic link, not followed")
                elif entry.is_dir(follow_symlinks=False):
                    subdirs.append((entry.name, tree_name))
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        files.append((entry.name, tree_name, st))
                    else:
                        self.problem(entry.path, "not a regular file any more, skipped")
                else:
                    self.problem(entry.path, "special file (fifo, socket or device), skipped")
            except FileNotFoundError:
                self.problem(entry.path, "vanished during the scan")
            except OSError as exc:
                self.problem(entry.path, f"cannot stat: {exc.strerror or exc}")
        return files, subdirs

    def _drop_collisions(
        self,
        disk_path: str,
        files: list[tuple[str, str, os.stat_result]],
        subdirs: list[tuple[str, str]],
    ) -> tuple[list[tuple[str, str, os.stat_result]], list[tuple[str, str]]]:
        """Names equal after NFC cannot both be shared: report and drop every one of them."""
        names = [(f[0], f[1]) for f in files] + subdirs
        counts = Counter(tree_name for _, tree_name in names)
        clashing = {tree_name for tree_name, count in counts.items() if count > 1}
        if not clashing:
            return files, subdirs
        for name, tree_name in names:
            if tree_name in clashing:
                self.problem(
                    os.path.join(disk_path, name),
                    f"name equals another after Unicode normalisation (NFC): {tree_name!r}",
                )
        return (
            [f for f in files if f[1] not in clashing],
            [d for d in subdirs if d[1] not in clashing],
        )

    def scan_files(
        self,
        dir_id: int,
        disk_path: str,
        files: list[tuple[str, str, os.stat_result]],
        result: _DirResult,
    ) -> tuple[list[_FileItem], bool]:
        """One directory's files: reuse clean rows, hash the rest, drop vanished rows.

        Returns the tree items and whether any row of the directory changed.
        """
        rows = self.index.dir_files(dir_id)
        items: list[_FileItem] = []
        changed = False
        racy_limit = self.racy_limit_ns
        for name, tree_name, st in files:
            row = rows.pop(name, None)
            if (
                row is not None
                and row[1] == st.st_size
                and row[2] == st.st_mtime_ns
                and row[3] == _signed64(st.st_ino)
                and row[4] == st.st_mode
                and st.st_mtime_ns < racy_limit
            ):
                flags = FLAG_EXECUTABLE if st.st_mode & stat.S_IXUSR else 0
                items.append((tree_name, flags, st.st_size, row[5]))
                result.chunks += row[6]
                self.stats.files_reused += 1
                self.done_bytes += st.st_size
                continue
            if not changed:
                changed = True
                self.write().invalidate_dir(dir_id)
            found = None
            if st.st_mtime_ns < racy_limit:
                found = self.renamed_into_index(dir_id, name, st, row)
            if found is None:
                found = self.hash_into_index(dir_id, os.path.join(disk_path, name), name, row)
            if found is None:
                continue
            flags = FLAG_EXECUTABLE if found.mode & stat.S_IXUSR else 0
            items.append((tree_name, flags, found.size, found.root))
            result.chunks += len(found.chunks) // CHUNK_RECORD.size
            self.done_bytes += found.size
        result.files = len(items)
        self.done_files += len(items)
        if rows:  # files gone from disk, or no longer shareable
            if not changed:
                changed = True
                self.write().invalidate_dir(dir_id)
            stale = [row[0] for row in rows.values()]
            self.remember_vanished(list(rows.values()))
            self.write().delete_files(stale)
        return items, changed

    def renamed_into_index(
        self, dir_id: int, name: str, st: os.stat_result, row: FileRow | None
    ) -> _Hashed | None:
        """A file the index knows under another name (same inode, size, mtime and mode, and
        not racily clean): its content is taken from there, not read again."""
        inode = _signed64(st.st_ino)
        known = self.vanished.get((inode, st.st_size, st.st_mtime_ns, st.st_mode))
        if known is None:
            known = self.index.file_by_identity(
                self.share_id, inode, st.st_size, st.st_mtime_ns, st.st_mode
            )
        if known is None:
            return None
        self.stats.files_renamed += 1
        hashed = _Hashed(st.st_size, st.st_mtime_ns, inode, st.st_mode, *known)
        fields = (hashed.size, hashed.mtime_ns, inode, hashed.mode, hashed.root, hashed.chunks)
        if row is None:
            self.add((dir_id, name, *fields))
        else:
            self.write().update_file(row[0], *fields)
        return hashed

    def hash_into_index(
        self, dir_id: int, path: str, name: str, row: FileRow | None
    ) -> _Hashed | None:
        """Hash one file and queue its row; None (with a problem, row dropped) if skipped."""
        hashed = self.hash_file(path)
        if hashed is None:
            if row is not None:
                self.write().delete_files([row[0]])
        elif row is None:
            self.add(
                (
                    dir_id,
                    name,
                    hashed.size,
                    hashed.mtime_ns,
                    hashed.inode,
                    hashed.mode,
                    hashed.root,
                    hashed.chunks,
                )
            )
        else:
            self.write().update_file(
                row[0],
                hashed.size,
                hashed.mtime_ns,
                hashed.inode,
                hashed.mode,
                hashed.root,
                hashed.chunks,
            )
        if hashed is not None and hashed.size > BLOCK_SIZE:
            self.maybe_commit(hashed.size)
        return hashed

    def store_directory(self, items: list[_FileItem], subtrees: list[tuple[str, Child]]) -> Child:
        """Build a directory's tree from its entries and store its nodes in the index."""
        entries = [
            DirEntry(name, EntryKind.FILE, flags, size, ContentHash(root))
            for name, flags, size, root in items
        ]
        entries.extend(
            DirEntry(name, EntryKind.DIRECTORY, 0, tree.size, tree.hash) for name, tree in subtrees
        )
        nodes: list[tuple[bytes, bytes]] = []

        def keep(node_hash: ContentHash, encoded: bytes, _node: object) -> None:
            nodes.append((node_hash, encoded))

        tree = build_directory(entries, TreeBuilder(DIR_TREE, keep))
        self.write().put_dir_nodes(nodes)
        return tree

    # -- reading files --------------------------------------------------------------------

    def hash_file(self, path: str) -> _Hashed | None:
        """Read and hash a file, retrying if it changes underneath; None (and a problem)."""
        for _attempt in range(READ_ATTEMPTS):
            try:
                return self._hash_once(path)
            except _FileChanged:
                log.debug("%s changed while being read, retrying", _display(path))
            except FileNotFoundError:
                self.problem(path, "vanished during the scan")
                return None
            except OSError as exc:
                self.problem(path, f"cannot read: {exc.strerror or exc}")
                return None
        self.problem(path, f"kept changing while being read ({READ_ATTEMPTS} attempts)")
        return None

    def _hash_once(self, path: str) -> _Hashed:
        fd = os.open(path, _OPEN_FLAGS)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise _FileChanged
            if before.st_size <= BLOCK_SIZE:
                packed = self._hash_small(fd, before.st_size)
            else:
                packed = _Pipeline(self.chunker, self._count_read).run(fd)
            if self.read_hook is not None:
                self.read_hook(path)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if _identity(before) != _identity(after):
            raise _FileChanged
        size = sum(length for _, length in CHUNK_RECORD.iter_unpack(packed))
        if size != before.st_size:
            raise _FileChanged
        self.stats.files_hashed += 1
        if len(packed) == CHUNK_RECORD.size:  # one chunk: the root is one leaf node
            cid, length = CHUNK_RECORD.unpack(packed)
            leaf = FILE_TREE.encode(LeafNode((ChunkRef(ContentHash(cid), length),)))
            root = FILE_TREE.node_hash(leaf)
        else:
            root = build_file_tree(packed).hash
        return _Hashed(
            size=size,
            mtime_ns=before.st_mtime_ns,
            inode=_signed64(before.st_ino),
            mode=before.st_mode,
            root=root,
            chunks=packed,
        )

    def _count_read(self, count: int) -> None:
        self.stats.bytes_read += count
        if self.progress is not None:
            self.progress(self.done_bytes + count, self.done_files)

    def _hash_small(self, fd: int, size: int) -> bytes:
        # One read of size + 1 bytes: a file that grew shows it by the extra byte (and by
        # its stat afterwards); short reads only happen near EOF or on odd file systems.
        data = os.read(fd, size + 1)
        while len(data) < size:
            more = os.read(fd, size + 1 - len(data))
            if not more:
                break
            data += more
        self.stats.bytes_read += len(data)
        if len(data) != size:
            raise _FileChanged
        if not data:
            return b""
        if size <= self.min_size:  # FastCDC never cuts below min_size
            return CHUNK_RECORD.pack(chunk_id(data), size)
        return b"".join(
            CHUNK_RECORD.pack(ref.id, ref.length) for ref in self.chunker.chunk_refs(data)
        )


def _subdirs_digest(subtrees: list[tuple[str, Child]]) -> bytes:
    """Identifies a directory's subdirectory entries (names, roots, sizes) for its cache."""
    hasher = blake3.blake3()
    for name, tree in sorted(subtrees, key=lambda item: name_sort_key(item[0])):
        hasher.update(name.encode("utf-8") + b"\0" + tree.hash + tree.size.to_bytes(8, "little"))
    return hasher.digest()


class _Pipeline:
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
        for _ in range(_PIPELINE_BUFFERS):
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


def scan_share(
    path: str | os.PathLike[str],
    index: IndexStore,
    *,
    now_ns: int | None = None,
    chunker: Chunker | None = None,
    progress: Progress | None = None,
    read_hook: ReadHook | None = None,
    ignore: IgnoreRule | None = None,
) -> ScanResult:
    """Index a file or folder as a share and return its manifest, counts and problems.

    ``now_ns`` is the scan's start on the file system's clock (default: the wall clock);
    files modified within :data:`RACY_WINDOW_NS` of the previous scan's start are read
    again. So a benchmark that rescans a tree it just wrote should backdate mtimes or wait
    that long before the first scan, or the rescan re-reads the youngest files.

    ``ignore(relative_path, is_directory)`` leaves out what it returns True for (a sync
    folder's ignore patterns and state directory); it sees NFC tree paths.

    Raises LocalProtocolError if ``path`` cannot be a share (missing, special file, a
    name that is not UTF-8) and StorageError if the index fails; every other trouble
    below ``path`` is a :class:`Problem` in the result.
    """
    started_ns = time.time_ns() if now_ns is None else now_ns
    top = os.path.realpath(os.fspath(path))
    try:
        top_stat = os.stat(top)
    except OSError as exc:
        raise LocalProtocolError(f"cannot share {_display(top)}: {exc.strerror or exc}") from exc
    single_file = stat.S_ISREG(top_stat.st_mode)
    if not single_file and not stat.S_ISDIR(top_stat.st_mode):
        raise LocalProtocolError(f"cannot share {_display(top)}: not a file or directory")
    base_name = os.path.basename(top) or "root"
    name = normalize_local_name(base_name)

    share = index.share_for_path(top, started_ns)
    generation, racy_reference_ns = index.begin_scan(share.id, started_ns)
    scan = _Scan(
        index,
        share.id,
        generation,
        racy_reference_ns - RACY_WINDOW_NS,
        chunker or Chunker(DEFAULT_CHUNKER),
        progress,
        read_hook,
        ignore,
    )
    try:
        result = _scan_single_file(scan, top, name) if single_file else _scan_top_dir(scan, top)
        scan.commit()
    except BaseException:
        scan.rollback()
        raise
    directories = result.directories
    manifest = default_manifest(name, result.tree, result.files, directories, single_file)
    root = manifest.root()
    index.finish_scan(share.id, generation, root, manifest.encode(), started_ns)
    log.info(
        "scanned %s: %d files, %d bytes, %d problems, root %s",
        _display(top),
        result.files,
        result.tree.size,
        len(scan.problems),
        root.hex()[:12],
    )
    return ScanResult(
        share_id=share.id,
        manifest=manifest,
        root=root,
        files=result.files,
        bytes=result.tree.size,
        chunks=result.chunks,
        directories=directories,
        problems=scan.problems,
        stats=scan.stats,
        ignored=scan.ignored,
    )


MAX_PARTIAL_DIRECTORIES = 256
"""More directories than this named at once: a full scan is cheaper than many small ones."""


def scan_directories(
    path: str | os.PathLike[str],
    index: IndexStore,
    directories: Collection[str],
    *,
    ignore: IgnoreRule | None = None,
    chunker: Chunker | None = None,
) -> PartScan | None:
    """Rescan only the named directories' own entries (on-disk paths inside the share), as a
    file-system watcher reports them: their files are reused or hashed as in a full scan, a
    new subdirectory is scanned whole, one gone from disk is dropped with all below. Costs
    O(entries of those directories), whatever the share's size.

    The share's root, manifest and scan time are left as the last full scan made them
    (the periodic full scan recomputes them cheaply from the directory caches, which this
    invalidates where it changed something). Returns None where only a full scan will do:
    none completed yet, too many directories, or a path that cannot be resolved.
    """
    top = os.path.realpath(os.fspath(path))
    share = index.share_for_path(top, time.time_ns())
    if share.root is None or share.scan_started_ns is None:
        return None
    targets = _resolve_targets(index, share.id, top, directories, ignore)
    if targets is None or len(targets) > MAX_PARTIAL_DIRECTORIES:
        return None
    scan = _Scan(
        index,
        share.id,
        share.scan_generation,
        share.scan_started_ns - RACY_WINDOW_NS,
        chunker or Chunker(DEFAULT_CHUNKER),
        None,
        None,
        ignore,
    )
    scan.visited = []
    part = PartScan(problems=scan.problems, stats=scan.stats, ignored=scan.ignored)
    try:
        for disk_path, (rel, dir_id) in sorted(targets.items(), key=lambda t: t[1][0].count("/")):
            if any(rel == d or rel.startswith(d + "/") for d in part.deep):
                continue  # inside a subtree this scan took whole already
            scan.scan_shallow(disk_path, rel, dir_id, part)
        scan.commit()
    except _TargetMoved:
        scan.rollback()
        return None  # a directory moved under us: a full scan sorts it out
    except BaseException:
        scan.rollback()
        raise
    for dir_id, rel in scan.visited:
        prefix = f"{rel}/" if rel else ""
        for name, row in index.dir_files(dir_id).items():
            tree_name = name if name.isascii() else normalize_local_name(name)
            part.files.append((prefix + tree_name, row[5], row[1], row[2], row[3], row[4]))
        if rel and rel not in part.directories:
            part.directories.append(rel)
    return part


def _resolve_targets(
    index: IndexStore,
    share_id: int,
    top: str,
    directories: Collection[str],
    ignore: IgnoreRule | None,
) -> dict[str, tuple[str, int]] | None:
    """On-disk directory -> (rel, dir id) for each named directory, or the nearest recorded
    one above it (a directory made or removed since the last scan is found from its parent).
    None if a name cannot be a tree name (the full scan reports it)."""
    targets: dict[str, tuple[str, int]] = {}
    for directory in directories:
        disk_path = os.path.normpath(directory)
        while True:
            if disk_path != top and not disk_path.startswith(top + os.sep):
                return None
            dir_id = index.dir_id(share_id, disk_path)
            if dir_id is not None and os.path.isdir(disk_path) and not os.path.islink(disk_path):
                break
            if disk_path == top:
                return None
            disk_path = os.path.dirname(disk_path)
        if disk_path in targets:
            continue
        try:
            parts = [] if disk_path == top else disk_path[len(top) + 1 :].split(os.sep)
            rel = "/".join(normalize_local_name(name) for name in parts)
        except InvalidNameError:
            return None
        if rel and ignore is not None and ignore(rel, True):
            continue
        targets[disk_path] = (rel, dir_id)
    return targets


def _scan_top_dir(scan: _Scan, top: str) -> _DirResult:
    result = scan.scan_dir(top, "", 0, None)
    if result is None:
        problem = scan.problems[-1]
        raise StorageError(f"cannot share {problem.path}: {problem.reason}")
    return result


def _scan_single_file(scan: _Scan, top: str, name: str) -> _DirResult:
    parent, disk_name = os.path.split(top)
    dir_id, _, _ = scan.write().visit_dir(scan.share_id, parent, "", None)
    scan.write().mark_dir(dir_id, "", scan.generation)
    result = _DirResult(Child(ContentHash(b""), 0))
    files = []
    try:
        st = os.lstat(top)
    except OSError as exc:
        scan.problem(top, f"cannot stat: {exc.strerror or exc}")
    else:
        files.append((disk_name, name, st))
    items, _ = scan.scan_files(dir_id, parent, files, result)
    result.tree = scan.store_directory(items, [])
    return result


@dataclass(frozen=True, slots=True)
class PlacedFile:
    """A file this node just wrote whose content it knows (a sync download)."""

    path: str
    """Relative to the share, ``/``-separated, as on disk."""
    size: int
    mtime_ns: int
    inode: int
    mode: int
    root: bytes
    chunks: bytes
    """Packed chunk list (32-byte id + 4-byte little-endian length per chunk)."""


def record_placed_files(index: IndexStore, share_path: str, placed: Sequence[PlacedFile]) -> None:
    """Record files as a scan would have, so the next scan reads none of them again (unless
    they are racily clean) and their chunks can be served at once."""
    if not placed:
        return
    top = os.path.realpath(share_path)
    share = index.share_for_path(top, time.time_ns())
    dir_ids: dict[str, int] = {}

    def directory(rel: str) -> int:
        if rel in dir_ids:
            return dir_ids[rel]
        parent_rel, _, _name = rel.rpartition("/")
        parent = None if rel == "" else directory(parent_rel)
        disk_path = os.path.join(top, *rel.split("/")) if rel else top
        dir_id, _tree, _digest = index.visit_dir(share.id, disk_path, rel, parent)
        dir_ids[rel] = dir_id
        return dir_id

    by_dir: dict[str, list[PlacedFile]] = {}
    for item in placed:
        by_dir.setdefault(item.path.rpartition("/")[0], []).append(item)
    with index.transaction():
        new_files: list[NewFile] = []
        for rel, items in by_dir.items():
            dir_id = directory(rel)
            rows = index.dir_files(dir_id)
            for item in items:
                name = item.path.rpartition("/")[2]
                row = rows.get(name)
                inode = _signed64(item.inode)
                fields = (item.size, item.mtime_ns, inode, item.mode, item.root, item.chunks)
                if row is None:
                    new_files.append((dir_id, name, *fields))
                else:
                    index.update_file(row[0], *fields)
            index.invalidate_dir(dir_id)
        index.add_files(new_files)
