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
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import blake3

from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker
from p2pfs.content.folder import (
    DIR_TREE,
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
from p2pfs.content.tree import Child, TreeBuilder
from p2pfs.errors import InvalidNameError, LocalProtocolError, StorageError
from p2pfs.ids import ContentHash
from p2pfs.store.assemble import is_partial_name
from p2pfs.store.filehash import BLOCK_SIZE, FileChanged, Hashed, hash_file_once
from p2pfs.store.index import CHUNK_RECORD, FileRow, IndexStore, NewFile, signed64

STATE_DIR_NAME = ".p2pfs"
"""A sync folder's own state directory (compared case-folded: on a file system that
ignores case, `.P2PFS` is the same directory)."""

log = logging.getLogger(__name__)

RACY_WINDOW_NS = 2_000_000_000
"""A file whose mtime is this close to (or after) the last scan's start may have changed
within the same timestamp tick after it was read (FAT has 2 s ticks), so its cached row is
not trusted: the file is read again, as git does for racily clean entries."""
READ_ATTEMPTS = 3
"""A file that changes while read is retried this many times, then reported."""
TORN_STAT_PAUSE = 0.001
"""The pause before a file whose size moved while its mtime and inode did not is looked
at again, and read again if its stat moved. A truncate or write changes the size first
and the times a few microseconds later, and a stat in between (a watcher's rescan, right
behind the write) sees the new size with the old mtime: recorded so, the content's version
carried a stale mtime, and the one that landed a moment later was never sent (mtime alone
is not a change; test_two_members_follow_each_others_changes, 1 run in ~80). A file whose
mtime was set back on purpose has the same stat after it."""
TORN_REREADS_PER_SCAN = 64
"""At most this many such pauses a scan: a tool that writes every file with one fixed
mtime (reproducible builds) must not cost a pause per file."""


def _pause(seconds: float) -> None:
    time.sleep(seconds)  # a module function: the tests stand in for the write's time update


_COMMIT_ROWS = 20_000
_COMMIT_BYTES = 256 << 20
_COMMIT_SECONDS = 2.0

Progress = Callable[[int, int], None]
"""Called with (bytes done, files done) so far, cumulative."""
ReadHook = Callable[[str], None]
"""Test seam: called with a file's path after its bytes were read, before it is re-checked."""
IgnoreRule = Callable[[str, bool], bool]
"""``(relative path, is_directory) -> leave it out``."""
FileState = tuple[str, bytes, int, int, int, int]
"""(path, root, size, mtime_ns, inode as stored, mode) of one file."""
FilesSeen = Callable[[list[FileState]], None]
"""Called with one directory's files as the scan leaves them (see ``scan_share``)."""


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
    leftovers: list[str] = field(default_factory=list)
    """Downloads' temp files seen (disk paths)."""


def astuple_stat(found: Hashed) -> tuple[int, int, int, int]:
    """(size, mtime_ns, inode as stored, mode) of a file as read."""
    return found.size, found.mtime_ns, found.inode, found.mode


def _display(path: str) -> str:
    """A printable form of a path whose bytes may not be UTF-8."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(slots=True)
class DirResult:
    tree: Child
    files: int = 0
    directories: int = 0
    chunks: int = 0


_S_IFMT, _S_IFREG, _S_IXUSR = 0o170000, stat.S_IFREG, stat.S_IXUSR
_INODE_SIGN = 1 << 63
_FileItem = tuple[str, int, int, bytes]
"""A file as its directory's tree lists it: (tree name, flags, size, root)."""


class Scan:
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
        self.progress = progress
        self.read_hook = read_hook
        self.stats = ScanStats()
        self.torn_rereads = 0
        """Files read once more this scan because their size moved alone (TORN_STAT_PAUSE)."""
        self.problems: list[Problem] = []
        self.ignored: list[str] = []
        """What the ignore rule left out: a sync folder on a file system that ignores case
        must not place a path over one of these names."""
        self.leftovers: list[str] = []
        """Disk paths of downloads' temp files seen (in progress, or left by an attempt)."""
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
        self.on_files: FilesSeen | None = None
        """Told each directory's files, if a caller wants them (see ``scan_share``)."""
        self._rel = ""

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
    ) -> DirResult | None:
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
        files, subdirs = self.list_entries(disk_path, rel, entries)
        del entries

        result = DirResult(Child(ContentHash(b""), 0))
        self._rel = rel
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

    def list_entries(
        self, disk_path: str, rel: str, entries: list[os.DirEntry[str]]
    ) -> tuple[list[tuple[str, str, os.stat_result]], list[tuple[str, str]]]:
        """A listing's shareable files (with lstat) and subdirectories, ignores applied."""
        files, subdirs, normalized = self._classify(entries)
        if normalized:  # names listed once each: only a normalised one can equal another
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

    def _classify(
        self, entries: list[os.DirEntry[str]]
    ) -> tuple[list[tuple[str, str, os.stat_result]], list[tuple[str, str]], bool]:
        """Split a listing into regular files (with lstat) and subdirectories; report the rest.
        The flag says whether a name was normalised (only then can two names collide)."""
        # The hot loop of an unchanged rescan (once per entry of the share): the common
        # cases (a plain ASCII name; a directory or a regular file, known from the
        # listing's d_type without a system call) are tested first, with local names.
        files: list[tuple[str, str, os.stat_result]] = []
        subdirs: list[tuple[str, str]] = []
        add_file, add_dir = files.append, subdirs.append
        normalized = False
        for entry in entries:
            name = entry.name
            if name[0] == "." and (is_partial_name(name) or name.casefold() == STATE_DIR_NAME):
                # A download's temp file, or a sync folder's state (its kept versions among
                # it) at any depth: never content of a share, even of a parent folder's.
                if is_partial_name(name):
                    self.leftovers.append(entry.path)
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
                normalized = True
            try:
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if st.st_mode & _S_IFMT == _S_IFREG:
                        add_file((name, tree_name, st))
                    else:
                        self.problem(entry.path, "not a regular file any more, skipped")
                elif entry.is_dir(follow_symlinks=False):
                    add_dir((name, tree_name))
                elif entry.is_symlink():
                    self.problem(entry.path, "symbolic link, not followed")
                else:
                    self.problem(entry.path, "special file (fifo, socket or device), skipped")
            except FileNotFoundError:
                self.problem(entry.path, "vanished during the scan")
            except OSError as exc:
                self.problem(entry.path, f"cannot stat: {exc.strerror or exc}")
        return files, subdirs, normalized

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
        result: DirResult,
    ) -> tuple[list[_FileItem], bool]:
        """One directory's files: reuse clean rows, hash the rest, drop vanished rows.

        Returns the tree items and whether any row of the directory changed.
        """
        # Rows without their ids: an unchanged directory never needs them (the full rows
        # are read once it has a change).
        states = self.index.dir_file_states(dir_id)
        rows: dict[str, FileRow] | None = None
        items: list[_FileItem] = []
        add_item = items.append
        changed = False
        racy_limit = self.racy_limit_ns
        on_files, prefix = self.on_files, f"{self._rel}/" if self._rel else ""
        seen: list[FileState] = []
        collect = seen.append if on_files is not None else None
        reused = reused_bytes = reused_chunks = 0
        # The hot loop of an unchanged rescan: one dict pop and four compares per file (no
        # tuple built to compare).
        for name, tree_name, st in files:
            known = states.pop(name, None)
            size, mtime_ns, inode, mode = st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode
            if inode >= _INODE_SIGN:  # stored as SQLite's signed 64 bits (filehash.signed64)
                inode -= 1 << 64
            if (
                known is not None
                and known[2] == mtime_ns
                and known[1] == size
                and known[3] == inode
                and known[4] == mode
                and mtime_ns < racy_limit
            ):
                add_item((tree_name, FLAG_EXECUTABLE if mode & _S_IXUSR else 0, size, known[5]))
                if collect is not None:
                    collect((prefix + tree_name, known[5], size, mtime_ns, inode, mode))
                reused_chunks += known[6]
                reused += 1
                reused_bytes += size
                continue
            if rows is None:
                rows = self.index.dir_files(dir_id)
            if not changed:
                changed = True
                self.write().invalidate_dir(dir_id)
            found = self.read_changed(dir_id, disk_path, name, st, rows.get(name))
            if found is None:
                continue
            flags = FLAG_EXECUTABLE if found.mode & stat.S_IXUSR else 0
            items.append((tree_name, flags, found.size, found.root))
            if collect is not None:
                collect((prefix + tree_name, found.root, *astuple_stat(found)))
            result.chunks += len(found.chunks) // CHUNK_RECORD.size
            self.done_bytes += found.size
        if on_files is not None and seen:
            on_files(seen)
        result.chunks += reused_chunks
        self.stats.files_reused += reused
        self.done_bytes += reused_bytes
        result.files = len(items)
        self.done_files += len(items)
        if states:  # files gone from disk, or no longer shareable
            if not changed:
                changed = True
                self.write().invalidate_dir(dir_id)
            self.drop_gone(dir_id, states.keys(), rows)
        return items, changed

    def drop_gone(self, dir_id: int, names: Iterable[str], rows: dict[str, FileRow] | None) -> None:
        """Drop the rows of a directory's files that are gone (kept to find moves)."""
        if rows is None:
            rows = self.index.dir_files(dir_id)
        gone = [rows[name] for name in names if name in rows]
        self.remember_vanished(gone)
        self.write().delete_files([row[0] for row in gone])

    def read_changed(
        self, dir_id: int, disk_path: str, name: str, st: os.stat_result, row: FileRow | None
    ) -> Hashed | None:
        """A file its row (if any) does not vouch for: found renamed, else read; its row
        queued. None (with a problem) if it could not be read."""
        found = None
        if st.st_mtime_ns < self.racy_limit_ns:
            found = self.renamed_into_index(dir_id, name, st, row)
        if found is None:
            found = self.hash_into_index(dir_id, os.path.join(disk_path, name), name, row)
        return found

    def renamed_into_index(
        self, dir_id: int, name: str, st: os.stat_result, row: FileRow | None
    ) -> Hashed | None:
        """A file the index knows under another name (same inode, size, mtime and mode, and
        not racily clean): its content is taken from there, not read again."""
        inode = signed64(st.st_ino)
        known = self.vanished.get((inode, st.st_size, st.st_mtime_ns, st.st_mode))
        if known is None:
            known = self.index.file_by_identity(
                self.share_id, inode, st.st_size, st.st_mtime_ns, st.st_mode
            )
        if known is None:
            return None
        self.stats.files_renamed += 1
        hashed = Hashed(st.st_size, st.st_mtime_ns, inode, st.st_mode, *known)
        fields = (hashed.size, hashed.mtime_ns, inode, hashed.mode, hashed.root, hashed.chunks)
        # Not read now: its chunks are hashed whenever they are served (no settled ctime).
        if row is None:
            self.add((dir_id, name, *fields, None))
        else:
            self.write().update_file(row[0], *fields)
        return hashed

    def hash_into_index(
        self, dir_id: int, path: str, name: str, row: FileRow | None
    ) -> Hashed | None:
        """Hash one file and queue its row; None (with a problem, row dropped) if skipped."""
        # A big file that changed is re-cut only around the change (its old cuts are known).
        previous = (
            self.index.file_chunks(row[5]) if row is not None and row[1] > BLOCK_SIZE else None
        )
        hashed = self.hash_file(path, previous)
        if (
            hashed is not None
            and row is not None
            and _size_moved_alone(hashed, row)
            and self.torn_rereads < TORN_REREADS_PER_SCAN
        ):
            self.torn_rereads += 1
            _pause(TORN_STAT_PAUSE)
            # Read again only if the stat moved meanwhile: a file set back on purpose (or
            # a big one) costs one stat, not a second read.
            if _stat_moved(path, hashed):
                hashed = self.hash_file(path, previous)
                if hashed is not None:
                    self.stats.files_hashed -= 1  # one file, read twice
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
                    hashed.settled_ctime_ns,
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
                hashed.settled_ctime_ns,
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

    def hash_file(self, path: str, previous: bytes | None = None) -> Hashed | None:
        """Read and hash a file, retrying if it changes underneath; None (and a problem)."""
        for _attempt in range(READ_ATTEMPTS):
            try:
                hashed = hash_file_once(
                    path,
                    self.chunker,
                    self._count_read,
                    self._count_small,
                    self.read_hook,
                    previous,
                )
            except FileChanged:
                log.debug("%s changed while being read, retrying", _display(path))
            except FileNotFoundError:
                self.problem(path, "vanished during the scan")
                return None
            except OSError as exc:
                self.problem(path, f"cannot read: {exc.strerror or exc}")
                return None
            else:
                self.stats.files_hashed += 1
                return hashed
        self.problem(path, f"kept changing while being read ({READ_ATTEMPTS} attempts)")
        return None

    def _count_read(self, count: int) -> None:
        self.stats.bytes_read += count
        if self.progress is not None:
            self.progress(self.done_bytes + count, self.done_files)

    def _count_small(self, count: int) -> None:
        self.stats.bytes_read += count


def _size_moved_alone(hashed: Hashed, row: FileRow) -> bool:
    """Read with another size than its row, but the row's mtime and inode: a write caught
    between its size and its time update (or an mtime set back on purpose)."""
    return hashed.size != row[1] and hashed.mtime_ns == row[2] and hashed.inode == row[3]


def _stat_moved(path: str, hashed: Hashed) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return True  # read again: that read reports what is wrong
    return (st.st_size, st.st_mtime_ns, signed64(st.st_ino)) != (
        hashed.size,
        hashed.mtime_ns,
        hashed.inode,
    )


def _subdirs_digest(subtrees: list[tuple[str, Child]]) -> bytes:
    """Identifies a directory's subdirectory entries (names, roots, sizes) for its cache."""
    hasher = blake3.blake3()
    for name, tree in sorted(subtrees, key=lambda item: name_sort_key(item[0])):
        hasher.update(name.encode("utf-8") + b"\0" + tree.hash + tree.size.to_bytes(8, "little"))
    return hasher.digest()


def scan_share(
    path: str | os.PathLike[str],
    index: IndexStore,
    *,
    now_ns: int | None = None,
    chunker: Chunker | None = None,
    progress: Progress | None = None,
    read_hook: ReadHook | None = None,
    ignore: IgnoreRule | None = None,
    on_files: FilesSeen | None = None,
) -> ScanResult:
    """Index a file or folder as a share and return its manifest, counts and problems.

    ``now_ns`` is the scan's start on the file system's clock (default: the wall clock);
    files modified within :data:`RACY_WINDOW_NS` of the previous scan's start are read
    again. So a benchmark that rescans a tree it just wrote should backdate mtimes or wait
    that long before the first scan, or the rescan re-reads the youngest files.

    ``ignore(relative_path, is_directory)`` leaves out what it returns True for (a sync
    folder's ignore patterns and state directory); it sees NFC tree paths.

    ``on_files`` is called once per directory with (path, root, size, mtime_ns, inode,
    mode) of each of its files the scan kept (reused, renamed or read; as
    :meth:`IndexStore.share_file_states` lists them after the scan), in the scan's thread:
    a sync folder compares them with its records there, a directory at a time, and holds
    no list of the folder's files.

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
    scan = Scan(
        index,
        share.id,
        generation,
        racy_reference_ns - RACY_WINDOW_NS,
        chunker or Chunker(DEFAULT_CHUNKER),
        progress,
        read_hook,
        ignore,
    )
    scan.on_files = on_files
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
        leftovers=scan.leftovers,
    )


def _scan_top_dir(scan: Scan, top: str) -> DirResult:
    result = scan.scan_dir(top, "", 0, None)
    if result is None:
        problem = scan.problems[-1]
        raise StorageError(f"cannot share {problem.path}: {problem.reason}")
    return result


def _scan_single_file(scan: Scan, top: str, name: str) -> DirResult:
    parent, disk_name = os.path.split(top)
    dir_id, _, _ = scan.write().visit_dir(scan.share_id, parent, "", None)
    scan.write().mark_dir(dir_id, "", scan.generation)
    result = DirResult(Child(ContentHash(b""), 0))
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
