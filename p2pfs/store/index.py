"""The node's SQLite index: shares, local files and their chunk lists, chunk locations.

One database per node home, one connection per :class:`IndexStore`. The connection may be
used from any thread (the daemon calls in through ``trio.to_thread``) but only from one at a
time: callers serialise. Every sqlite3 failure leaves as :class:`~p2pfs.errors.StorageError`.

Budget: the index holds at most ~1 MiB per GiB of data it describes. A file's chunk list is
one packed blob (36 bytes a chunk) and a chunk's location one 8-byte-key row, so a chunk
costs ~60 bytes; file-tree nodes are rebuilt from the packed list rather than stored.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import resources

from p2pfs.content.chunking import ChunkRef, chunk_id
from p2pfs.content.folder import FILE_TREE
from p2pfs.content.names import normalize_local_name
from p2pfs.content.tree import Child, TreeBuilder
from p2pfs.errors import IntegrityError, InvalidNameError, StorageError
from p2pfs.ids import HASH_LEN, ContentHash

log = logging.getLogger(__name__)

INDEX_FILENAME = "index.sqlite3"
CHUNK_RECORD = struct.Struct(f"<{HASH_LEN}sI")
"""One chunk in a packed chunk list: id, then length (little-endian u32)."""

_MIGRATION_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")

FileRow = tuple[int, int, int, int, int, bytes, int]
"""A file as a rescan compares it: (id, size, mtime_ns, inode, mode, root, chunk count)."""
RowState = tuple[str, int, int, int, int, bytes, int]
"""A file as an unchanged rescan compares it: (on-disk name, size, mtime_ns, inode, mode,
root, chunk count)."""
NewFile = tuple[int, str, int, int, int, int, bytes, bytes, int | None]
"""A file to add: (dir id, on-disk name, size, mtime_ns, inode, mode, root, packed chunks,
settled ctime or None: see filehash.settled_ctime)."""
StatRow = tuple[int, int, int, int]
"""A file as a sync folder checks it before touching it: (id, size, mtime_ns, inode), the
inode as ``st_ino`` gives it (unsigned)."""
_NAMES_PER_QUERY = 32
"""Up to this many names of one directory are looked up one by one; more read its rows."""
_INODE_MASK = (1 << 64) - 1


def _state_of(
    rel: str, stored: str, root: bytes, size: int, mtime_ns: int, inode: int, mode: int
) -> tuple[str, bytes, int, int, int, int]:
    """(path, root, size, mtime_ns, inode, mode) of a file row (its tree path normalised)."""
    name = stored
    if not name.isascii() or "\\" in name:  # the scanner's shortcut, as there
        try:
            name = normalize_local_name(stored)
        except InvalidNameError as exc:
            raise StorageError(f"index: stored name {stored!r} is invalid") from exc
    return (f"{rel}/{name}" if rel else name, root, size, mtime_ns, inode, mode)


def _stat_row(row: Sequence[int]) -> StatRow:
    # The inode is stored as SQLite's signed 64 bits (filehash.signed64): back to st_ino's.
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3]) & _INODE_MASK)


def unpack_chunks(packed: bytes) -> list[ChunkRef]:
    if len(packed) % CHUNK_RECORD.size:
        raise StorageError("index: packed chunk list has a ragged length")
    return [ChunkRef(ContentHash(cid), length) for cid, length in CHUNK_RECORD.iter_unpack(packed)]


def chunk_prefix(cid: bytes) -> int:
    """The chunk-location key: the id's first 8 bytes as a signed 64-bit integer."""
    return int.from_bytes(cid[:8], "little", signed=True)


LOCATE_BATCH = 500
"""Chunk ids per locate_chunks query (SQLite's default bound is 32,766 variables)."""

_INSERT_LOCATION = (
    "INSERT OR IGNORE INTO chunk_locations (prefix, file_id, offset, length) VALUES (?, ?, ?, ?)"
)


def _location_rows(file_id: int, packed: bytes) -> list[tuple[int, int, int, int]]:
    rows = []
    offset = 0
    for position, (_cid, length) in enumerate(CHUNK_RECORD.iter_unpack(packed)):
        start = position * CHUNK_RECORD.size
        rows.append((chunk_prefix(packed[start : start + 8]), file_id, offset, length))
        offset += length
    return rows


def build_file_tree(packed: bytes, nodes: dict[ContentHash, bytes] | None = None) -> Child:
    """Rebuild a file's tree from its packed chunk list; fill ``nodes`` (hash -> encoding)."""
    sink = None
    if nodes is not None:
        store = nodes

        def sink(node_hash: ContentHash, encoded: bytes, _node: object) -> None:
            store[node_hash] = encoded

    builder = TreeBuilder(FILE_TREE, sink)
    for cid, length in CHUNK_RECORD.iter_unpack(packed):
        builder.add(ChunkRef(ContentHash(cid), length))
    return builder.finish()


@dataclass(frozen=True, slots=True)
class ShareRecord:
    id: int
    local_path: str
    root: ContentHash | None
    manifest: bytes | None
    created_ns: int
    scan_started_ns: int | None
    scan_generation: int


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A file of a share as the index knows it."""

    id: int
    path: str
    """Normalised path inside the share (``/``-separated)."""
    local_path: str
    size: int
    mtime_ns: int
    inode: int
    mode: int
    root: ContentHash
    chunks: bytes
    """Packed chunk list (see :data:`CHUNK_RECORD`)."""

    def chunk_refs(self) -> list[ChunkRef]:
        return unpack_chunks(self.chunks)


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where a chunk's bytes were, as of the last scan (verify after reading)."""

    path: str
    offset: int
    length: int
    settled: tuple[int, int, int, int] | None = field(default=None, compare=False)
    """The file's (size, mtime_ns, ctime_ns, inode) when the scan read it, if its ctime was
    settled then (filehash.settled_ctime): while its stat still shows these, no write has
    touched its bytes, and a server may send them unhashed (ChunkReader)."""


@contextmanager
def _guard(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"index: {what} failed: {exc}") from exc


def _migrations() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("p2pfs.store").joinpath("schema").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    found.sort()
    for position, (version, _) in enumerate(found, start=1):
        if version != position:
            raise StorageError(f"index: schema migrations are not numbered 1..n ({version})")
    return found


SCHEMA_VERSION = len(_migrations())
"""The newest schema this code knows."""


class IndexStore:
    """The SQLite index of one node home. Plain blocking methods; callers serialise."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with _guard(f"opening {self.path}"):
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    def _setup(self) -> None:
        with _guard(f"opening {self.path}"):
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            # Random-keyed indexes (chunk prefixes, file roots) touch pages all over; a
            # 16 MiB page cache keeps a big scan from spilling them mid-transaction.
            self._conn.execute("PRAGMA cache_size=-16384")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            row = self._conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"index {self.path} has schema version {current}, newer than this p2pfs "
                f"knows ({SCHEMA_VERSION}); upgrade p2pfs"
            )
        for version, script in _migrations()[current:]:
            log.info("index %s: applying schema migration %04d", self.path, version)
            # executescript commits any open transaction first, so the transaction (and
            # the version row that records it) lives inside the script itself.
            try:
                self._conn.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\n"
                    f"INSERT INTO schema_version (version) VALUES ({version});\nCOMMIT;"
                )
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise StorageError(f"index: migration {version:04d} failed: {exc}") from exc

    @property
    def connection(self) -> sqlite3.Connection:
        """For sibling stores sharing this database file and its one writer (store/folders)."""
        return self._conn

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        with _guard("closing"):
            self._conn.close()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def begin(self) -> None:
        """Open a write transaction (see :meth:`transaction` for the usual form)."""
        with _guard("begin"):
            self._conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        with _guard("commit"):
            self._conn.execute("COMMIT")

    def rollback(self) -> None:
        with _guard("rollback"):
            self._conn.execute("ROLLBACK")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes: all of them land, or none (nests by joining the outer one)."""
        if self._conn.in_transaction:
            yield
            return
        self.begin()
        try:
            yield
        except BaseException:
            self.rollback()
            raise
        self.commit()

    def schema_version(self) -> int:
        with _guard("reading schema version"):
            row = self._conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def checkpoint(self) -> None:
        """Fold the WAL into the main file (so its size is the index's real size)."""
        with _guard("checkpoint"):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def size_bytes(self) -> int:
        """Bytes the index occupies on disk (main file plus WAL)."""
        total = 0
        for suffix in ("", "-wal"):
            with suppress(FileNotFoundError):
                total += os.stat(self.path + suffix).st_size
        return total

    # -- shares ---------------------------------------------------------------------------

    _SHARE_COLUMNS = "id, local_path, root, manifest, created_ns, scan_started_ns, scan_generation"

    def _share_from_row(self, row: tuple[object, ...] | None) -> ShareRecord | None:
        if row is None:
            return None
        return ShareRecord(*row)  # type: ignore[arg-type]

    def share_for_path(self, local_path: str, created_ns: int) -> ShareRecord:
        """The share rooted at ``local_path``, created (with ``created_ns``) if new."""
        with _guard("reading share"), self.transaction():
            self._conn.execute(
                "INSERT OR IGNORE INTO shares (local_path, created_ns) VALUES (?, ?)",
                (local_path, created_ns),
            )
            row = self._conn.execute(
                f"SELECT {self._SHARE_COLUMNS} FROM shares WHERE local_path = ?",
                (local_path,),
            ).fetchone()
        share = self._share_from_row(row)
        assert share is not None
        return share

    def forget_share(self, share_id: int) -> None:
        """Drop a share's rows (its files stay on disk)."""
        with _guard("forgetting share"), self.transaction():
            self._delete_files_where(
                "dir_id IN (SELECT id FROM dirs WHERE share_id = ?)", (share_id,)
            )
            self._conn.execute("DELETE FROM dirs WHERE share_id = ?", (share_id,))
            self._conn.execute("DELETE FROM shares WHERE id = ?", (share_id,))

    def share(self, share_id: int) -> ShareRecord | None:
        with _guard("reading share"):
            row = self._conn.execute(
                f"SELECT {self._SHARE_COLUMNS} FROM shares WHERE id = ?", (share_id,)
            ).fetchone()
        return self._share_from_row(row)

    def share_by_root(self, root: bytes) -> ShareRecord | None:
        with _guard("reading share"):
            row = self._conn.execute(
                f"SELECT {self._SHARE_COLUMNS} FROM shares WHERE root = ? ORDER BY id LIMIT 1",
                (root,),
            ).fetchone()
        return self._share_from_row(row)

    def shares(self) -> list[ShareRecord]:
        with _guard("listing shares"):
            rows = self._conn.execute(
                f"SELECT {self._SHARE_COLUMNS} FROM shares ORDER BY id"
            ).fetchall()
        return [ShareRecord(*row) for row in rows]

    def begin_scan(self, share_id: int, started_ns: int) -> tuple[int, int]:
        """Start a scan of a share: returns (generation, racy reference time).

        The generation marks the directories this scan sees. The reference time is the
        start of the last completed scan, or of this one if none completed: every row in
        the index was written after it, so rows whose mtime is near or after it may be
        racily clean.
        """
        with _guard("starting scan"), self.transaction():
            row = self._conn.execute(
                "UPDATE shares SET scan_generation = scan_generation + 1, "
                "scan_started_ns = coalesce(scan_started_ns, ?) WHERE id = ? "
                "RETURNING scan_generation, scan_started_ns",
                (started_ns, share_id),
            ).fetchone()
        if row is None:
            raise StorageError(f"index: no share {share_id}")
        return int(row[0]), int(row[1])

    def finish_scan(
        self,
        share_id: int,
        generation: int,
        root: bytes,
        manifest: bytes,
        scan_started_ns: int,
    ) -> None:
        """Record a completed scan and drop what it did not see (vanished directories)."""
        with _guard("finishing scan"), self.transaction():
            stale = [
                dir_id
                for (dir_id,) in self._conn.execute(
                    "SELECT id FROM dirs WHERE share_id = ? AND generation != ?",
                    (share_id, generation),
                )
            ]
            for dir_id in stale:
                self._delete_files_where("dir_id = ?", (dir_id,))
            self._conn.executemany("DELETE FROM dirs WHERE id = ?", [(d,) for d in stale])
            self._conn.execute(
                "UPDATE shares SET root = ?, manifest = ?, scan_started_ns = ? WHERE id = ?",
                (root, manifest, scan_started_ns, share_id),
            )

    # -- directories and files ------------------------------------------------------------

    def visit_dir(
        self, share_id: int, path: str, rel: str, parent_id: int | None
    ) -> tuple[int, bytes | None, bytes | None]:
        """A share's directory at ``path``: (id, cached tree hash, cached subdirs digest).

        A new directory changes its parent's entries, so it invalidates the parent's cached
        tree in the same transaction. Callers mark the directory seen with :meth:`mark_dir`.
        """
        with _guard("recording directory"):
            row = self._conn.execute(
                "SELECT id, tree_hash, subdirs_digest FROM dirs WHERE share_id = ? AND path = ?",
                (share_id, path),
            ).fetchone()
            if row is not None:
                return int(row[0]), row[1], row[2]
            with self.transaction():
                cursor = self._conn.execute(
                    "INSERT INTO dirs (share_id, path, rel, generation) VALUES (?, ?, ?, 0)",
                    (share_id, path, rel),
                )
                if parent_id is not None:
                    self._conn.execute(
                        "UPDATE dirs SET tree_hash = NULL WHERE id = ?", (parent_id,)
                    )
            assert cursor.lastrowid is not None
            return cursor.lastrowid, None, None

    def mark_dir(self, dir_id: int, rel: str, generation: int) -> None:
        """Record that scan ``generation`` saw this directory (under share path ``rel``)."""
        with _guard("recording directory"):
            self._conn.execute(
                "UPDATE dirs SET generation = ?, rel = ? WHERE id = ?", (generation, rel, dir_id)
            )

    def invalidate_dir(self, dir_id: int) -> None:
        """Forget a directory's cached tree: its rows are about to change."""
        with _guard("recording directory"):
            self._conn.execute("UPDATE dirs SET tree_hash = NULL WHERE id = ?", (dir_id,))

    def set_dir_tree(self, dir_id: int, tree_hash: bytes, subdirs_digest: bytes) -> None:
        with _guard("recording directory"):
            self._conn.execute(
                "UPDATE dirs SET tree_hash = ?, subdirs_digest = ? WHERE id = ?",
                (tree_hash, subdirs_digest, dir_id),
            )

    def dir_id(self, share_id: int, path: str) -> int | None:
        """The id of a share's directory at on-disk ``path``, if a scan recorded it."""
        with _guard("reading directory"):
            row = self._conn.execute(
                "SELECT id FROM dirs WHERE share_id = ? AND path = ?", (share_id, path)
            ).fetchone()
        return None if row is None else int(row[0])

    def child_dirs(self, share_id: int, path: str) -> dict[str, tuple[int, str]]:
        """The recorded subdirectories right below on-disk ``path``: path -> (id, rel).

        A range of the (share_id, path) index: every path below ``path/`` sorts before
        ``path0`` ('0' follows '/'), so only that subtree's rows are read."""
        with _guard("reading directory"):
            rows = self._conn.execute(
                "SELECT path, id, rel FROM dirs WHERE share_id = ? AND path > ? AND path < ?",
                (share_id, path + os.sep, path + chr(ord(os.sep) + 1)),
            ).fetchall()
        start = len(path) + 1
        return {p: (i, rel) for p, i, rel in rows if os.sep not in p[start:]}

    def forget_dir_tree(self, share_id: int, path: str) -> list[FileRow]:
        """Drop the directory at on-disk ``path``, everything below it and their files (it
        is gone from disk, or now ignored); returns the dropped files' rows."""
        with _guard("dropping directory"), self.transaction():
            ids = [
                int(dir_id)
                for (dir_id,) in self._conn.execute(
                    "SELECT id FROM dirs WHERE share_id = ? AND (path = ? OR "
                    "(path > ? AND path < ?))",
                    (share_id, path, path + os.sep, path + chr(ord(os.sep) + 1)),
                )
            ]
            dropped: list[FileRow] = []
            for dir_id in ids:
                dropped.extend(self.dir_files(dir_id).values())
                self._delete_files_where("dir_id = ?", (dir_id,))
            self._conn.executemany("DELETE FROM dirs WHERE id = ?", [(d,) for d in ids])
        return dropped

    def dir_files(self, dir_id: int) -> dict[str, FileRow]:
        """The files of one directory by on-disk name, in one query."""
        with _guard("reading directory"):
            rows = self._conn.execute(
                "SELECT name, id, size, mtime_ns, inode, mode, root, length(chunks) / ? "
                "FROM files WHERE dir_id = ?",
                (CHUNK_RECORD.size, dir_id),
            ).fetchall()
        return {row[0]: row[1:] for row in rows}

    def dir_file_states(self, dir_id: int) -> dict[str, RowState]:
        """The files of one directory by on-disk name as an unchanged rescan compares them
        (:data:`RowState`: no row id, one column fewer per file than :meth:`dir_files`)."""
        with _guard("reading directory"):
            rows = self._conn.execute(
                "SELECT name, size, mtime_ns, inode, mode, root, length(chunks) / ? "
                "FROM files WHERE dir_id = ?",
                (CHUNK_RECORD.size, dir_id),
            ).fetchall()
        # Each row kept whole (name first): slicing the name off cost a tuple per file.
        return {row[0]: row for row in rows}

    def files_at(self, top: str, paths: Iterable[str]) -> dict[str, StatRow]:
        """The files the index holds (as last scanned or placed) at those of ``paths``
        (normalised paths inside the share at on-disk ``top``): path -> :data:`StatRow`.

        What a sync folder asks before it replaces or deletes a file, so it keeps no state
        per file in memory: one directory lookup per directory named (by its on-disk path,
        which is the normalised one for an ASCII name; by ``rel`` otherwise), then each
        ASCII name through the (dir_id, name) index, or the directory's rows when a name
        may be stored in another normal form."""
        by_dir: dict[str, list[str]] = {}
        for path in paths:
            rel, _, name = path.rpartition("/")
            by_dir.setdefault(rel, []).append(name)
        found: dict[str, StatRow] = {}
        if not by_dir:
            return found
        share_id = self.share_id_at(top)
        if share_id is None:
            return found
        with _guard("reading file states"):
            for rel, names in by_dir.items():
                prefix = f"{rel}/" if rel else ""
                for dir_id in self._dirs_at(share_id, top, rel):
                    plain = [n for n in names if n.isascii() and "\\" not in n]
                    if len(plain) == len(names) and len(names) <= _NAMES_PER_QUERY:
                        for name in names:
                            hit = self._conn.execute(
                                "SELECT id, size, mtime_ns, inode FROM files "
                                "WHERE dir_id = ? AND name = ?",
                                (dir_id, name),
                            ).fetchone()
                            if hit is not None:
                                found[prefix + name] = _stat_row(hit)
                        continue
                    wanted = set(names)
                    for stored, *rest in self._conn.execute(
                        "SELECT name, id, size, mtime_ns, inode FROM files WHERE dir_id = ?",
                        (dir_id,),
                    ):
                        name = stored
                        if not name.isascii() or "\\" in name:
                            try:
                                name = normalize_local_name(stored)
                            except InvalidNameError:
                                continue  # never a tree name: no path asks for it
                        if name in wanted:
                            found[prefix + name] = _stat_row(rest)
        return found

    def _dirs_at(self, share_id: int, top: str, rel: str) -> list[int]:
        """The recorded directories whose normalised path in the share is ``rel``."""
        disk_path = os.path.join(top, *rel.split("/")) if rel else top
        ids = [
            int(dir_id)
            for (dir_id,) in self._conn.execute(
                "SELECT id FROM dirs WHERE share_id = ? AND path = ?", (share_id, disk_path)
            )
        ]
        if not rel.isascii() or "\\" in rel:
            # Stored under another normal form on disk: found by its normalised path (no
            # index on rel: a scan of the share's directories, for such names only).
            ids += [
                int(dir_id)
                for (dir_id,) in self._conn.execute(
                    "SELECT id FROM dirs WHERE share_id = ? AND rel = ? AND path != ?",
                    (share_id, rel, disk_path),
                )
            ]
        return ids

    def forget_files_at(self, top: str, paths: Iterable[str]) -> None:
        """Drop the rows of those of ``paths`` (as :meth:`files_at` finds them): their
        files were moved away, and the next placement there must find the path empty."""
        ids = [(row[0],) for row in self.files_at(top, paths).values()]
        if not ids:
            return
        with _guard("dropping files"), self.transaction():
            # Their directories' cached trees listed them: rebuilt by the next scan.
            self._conn.executemany(
                "UPDATE dirs SET tree_hash = NULL WHERE id = (SELECT dir_id FROM files "
                "WHERE id = ?)",
                ids,
            )
            self.delete_files(file_id for (file_id,) in ids)

    def share_id_at(self, top: str) -> int | None:
        """The id of the share at on-disk ``top``, if one was recorded."""
        with _guard("reading share"):
            row = self._conn.execute(
                "SELECT id FROM shares WHERE local_path = ?", (top,)
            ).fetchone()
        return None if row is None else int(row[0])

    def add_files(self, files: Sequence[NewFile]) -> None:
        """Insert files (names new in their directories) and their chunk locations."""
        if not files:
            return
        with _guard("adding files"), self.transaction():
            # Ids are assigned here so that one executemany inserts a whole batch (the
            # connection is the only writer while the transaction holds the write lock).
            (last,) = self._conn.execute("SELECT coalesce(max(id), 0) FROM files").fetchone()
            self._conn.executemany(
                "INSERT INTO files (id, dir_id, name, size, mtime_ns, inode, mode, root, "
                "chunks, settled_ctime_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(last + position, *file) for position, file in enumerate(files, start=1)],
            )
            self._conn.executemany(
                _INSERT_LOCATION,
                [
                    row
                    for position, file in enumerate(files, start=1)
                    for row in _location_rows(last + position, file[7])
                ],
            )

    def update_file(
        self,
        file_id: int,
        size: int,
        mtime_ns: int,
        inode: int,
        mode: int,
        root: bytes,
        chunks: bytes,
        settled_ctime_ns: int | None = None,
    ) -> None:
        """Replace a file's stat and content; chunk locations follow the content.
        ``settled_ctime_ns``: see filehash.settled_ctime (None: the file's bytes were not
        read now, and its chunks are hashed whenever they are served)."""
        with _guard("updating file"), self.transaction():
            row = self._conn.execute(
                "SELECT root, chunks FROM files WHERE id = ?", (file_id,)
            ).fetchone()
            if row is None:
                raise StorageError(f"index: no file {file_id}")
            content_changed = row[0] != root or row[1] != chunks
            if content_changed:
                self._drop_locations(file_id, row[1])
                self._conn.execute(
                    "UPDATE files SET size = ?, mtime_ns = ?, inode = ?, mode = ?, root = ?, "
                    "chunks = ?, settled_ctime_ns = ? WHERE id = ?",
                    (size, mtime_ns, inode, mode, root, chunks, settled_ctime_ns, file_id),
                )
                self._add_locations(file_id, chunks)
            else:
                self._conn.execute(
                    "UPDATE files SET size = ?, mtime_ns = ?, inode = ?, mode = ?, "
                    "settled_ctime_ns = ? WHERE id = ?",
                    (size, mtime_ns, inode, mode, settled_ctime_ns, file_id),
                )

    def file_by_identity(
        self, share_id: int, inode: int, size: int, mtime_ns: int, mode: int
    ) -> tuple[bytes, bytes] | None:
        """(root, packed chunks) of a file of the share with this inode, size, mtime and mode:
        the same file under another name (a rename or move), whose content is known."""
        with _guard("finding file"):
            row = self._conn.execute(
                "SELECT f.root, f.chunks FROM files f JOIN dirs d ON d.id = f.dir_id "
                "WHERE f.inode = ? AND f.size = ? AND f.mtime_ns = ? AND f.mode = ? "
                "AND d.share_id = ? LIMIT 1",
                (inode, size, mtime_ns, mode, share_id),
            ).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def delete_files(self, file_ids: Iterable[int]) -> None:
        with _guard("deleting files"), self.transaction():
            for file_id in file_ids:
                self._delete_files_where("id = ?", (file_id,))

    def _delete_files_where(self, condition: str, args: tuple[object, ...]) -> None:
        rows = self._conn.execute(
            f"SELECT id, chunks FROM files WHERE {condition}", args
        ).fetchall()
        for file_id, chunks in rows:
            self._drop_locations(file_id, chunks)
        self._conn.executemany("DELETE FROM files WHERE id = ?", [(row[0],) for row in rows])

    def _add_locations(self, file_id: int, chunks: bytes) -> None:
        self._conn.executemany(_INSERT_LOCATION, _location_rows(file_id, chunks))

    def _drop_locations(self, file_id: int, chunks: bytes) -> None:
        self._conn.executemany(
            "DELETE FROM chunk_locations WHERE prefix = ? AND file_id = ?",
            [
                (chunk_prefix(chunks[i : i + 8]), file_id)
                for i in range(0, len(chunks), CHUNK_RECORD.size)
            ],
        )

    def share_directories(self, share_id: int) -> list[str]:
        """The share's directories (normalised relative paths) its last scan saw, top
        excluded."""
        with _guard("listing directories"):
            rows = self._conn.execute(
                "SELECT d.rel FROM dirs d JOIN shares s ON s.id = d.share_id "
                "WHERE d.share_id = ? AND d.generation = s.scan_generation AND d.rel != ''",
                (share_id,),
            ).fetchall()
        return [rel for (rel,) in rows]

    def share_file_states(self, share_id: int) -> list[tuple[str, bytes, int, int, int, int]]:
        """(path, root, size, mtime_ns, inode, mode) of every file of a share, in no order:
        what a sync folder keeps of a scan. Unlike :meth:`share_files`, no chunk lists, local
        paths or sort (a third of an unchanged 20k-file rescan went there)."""
        with _guard("listing file states"):
            rows = self._conn.execute(
                "SELECT d.rel, f.name, f.root, f.size, f.mtime_ns, f.inode, f.mode "
                "FROM files f JOIN dirs d ON d.id = f.dir_id WHERE d.share_id = ?",
                (share_id,),
            ).fetchall()
        return [_state_of(*row) for row in rows]

    def iter_file_states(
        self, share_id: int, batch: int = 4096
    ) -> Iterator[list[tuple[str, bytes, int, int, int, int]]]:
        """:meth:`share_file_states` in batches of ``batch`` files, read on a read-only
        connection of its own (WAL: what was committed), so a worker thread may stream them
        while the index's connection serves others: a first scan's changes are compared a
        batch at a time, not held for every file."""
        with _guard("opening a file-state reader"):
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            with _guard("reading file states"):
                conn.execute("PRAGMA query_only=ON")
            last = -1
            while True:
                with _guard("reading file states"):
                    rows = conn.execute(
                        "SELECT f.id, d.rel, f.name, f.root, f.size, f.mtime_ns, f.inode, "
                        "f.mode FROM files f JOIN dirs d ON d.id = f.dir_id "
                        "WHERE d.share_id = ? AND f.id > ? ORDER BY f.id LIMIT ?",
                        (share_id, last, batch),
                    ).fetchall()
                if not rows:
                    return
                last = rows[-1][0]
                yield [_state_of(*row[1:]) for row in rows]
        finally:
            conn.close()

    def share_files(self, share_id: int) -> Iterator[FileRecord]:
        """Every file of a share in path order (the order of its directory trees)."""
        with _guard("listing files"):
            rows = self._conn.execute(
                "SELECT f.id, d.rel, d.path, f.name, f.size, f.mtime_ns, f.inode, f.mode, "
                "f.root, f.chunks FROM files f JOIN dirs d ON d.id = f.dir_id "
                "WHERE d.share_id = ? ORDER BY d.rel, f.name",
                (share_id,),
            ).fetchall()
        records = []
        for file_id, rel, dir_path, name, size, mtime_ns, inode, mode, root, chunks in rows:
            try:
                tree_name = normalize_local_name(name)
            except InvalidNameError as exc:
                raise StorageError(f"index: stored name {name!r} is invalid") from exc
            path = f"{rel}/{tree_name}" if rel else tree_name
            local = os.path.join(dir_path, name)
            records.append(
                FileRecord(file_id, path, local, size, mtime_ns, inode, mode, root, chunks)
            )
        # Tree order is by UTF-8 bytes of each component, which SQLite's text order on
        # on-disk names does not always match (NFD vs NFC), so sort here.
        records.sort(key=lambda record: [part.encode() for part in record.path.split("/")])
        yield from records

    # -- chunks and trees -----------------------------------------------------------------

    def locate_chunk(self, cid: bytes, share_root: bytes | None = None) -> list[ChunkLocation]:
        """Where a chunk with id ``cid`` may be read locally (in one share, if given).

        Candidates share the id's first 8 bytes; reading one verifies the full id
        (:func:`read_chunk`), so a prefix collision or a stale row costs a retry, never a
        wrong byte.
        """
        query = f"SELECT {_LOCATION_COLUMNS} FROM chunk_locations c {_LOCATION_JOINS}"
        if share_root is None:
            args: tuple[object, ...] = (chunk_prefix(cid),)
            query += "WHERE c.prefix = ?"
        else:
            args = (chunk_prefix(cid), share_root)
            query += "JOIN shares s ON s.id = d.share_id WHERE c.prefix = ? AND s.root = ?"
        with _guard("locating chunk"):
            rows = self._conn.execute(query, args).fetchall()
        return [_location(*row) for row in rows]

    def locate_chunks(
        self, cids: Sequence[bytes], share_root: bytes | None = None, *, share_id: int | None = None
    ) -> list[list[ChunkLocation]]:
        """``locate_chunk`` of each id (in the share with id ``share_id`` if given, else
        the one with root ``share_root`` if given), in one query per LOCATE_BATCH
        distinct ids: a request of small files (one chunk each) made one query per
        chunk."""
        prefixes = [chunk_prefix(cid) for cid in cids]
        found: dict[int, list[ChunkLocation]] = {}
        distinct = list(dict.fromkeys(prefixes))
        query = f"SELECT c.prefix, {_LOCATION_COLUMNS} FROM chunk_locations c {_LOCATION_JOINS}"
        scope: tuple[object, ...] = ()
        if share_id is not None:
            query += "WHERE d.share_id = ? AND "
            scope = (share_id,)
        elif share_root is not None:
            query += "JOIN shares s ON s.id = d.share_id WHERE s.root = ? AND "
            scope = (share_root,)
        else:
            query += "WHERE "
        for start in range(0, len(distinct), LOCATE_BATCH):
            part = distinct[start : start + LOCATE_BATCH]
            args: tuple[object, ...] = (*scope, *part)
            marks = ",".join("?" * len(part))
            with _guard("locating chunks"):
                rows = self._conn.execute(f"{query}c.prefix IN ({marks})", args).fetchall()
            for prefix, *location in rows:
                found.setdefault(prefix, []).append(_location(*location))
        return [list(found.get(prefix, ())) for prefix in prefixes]

    def file_chunks(self, root: bytes) -> bytes | None:
        """The packed chunk list of a file with tree root ``root``, or None."""
        with _guard("reading file"):
            row = self._conn.execute(
                "SELECT chunks FROM files WHERE substr(root, 1, 8) = ? AND root = ? LIMIT 1",
                (root[:8], root),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def file_chunks_many(
        self, roots: Sequence[bytes], share_path: str | None = None
    ) -> dict[bytes, bytes]:
        """``file_chunks`` of each root that a file has (of the share whose real path is
        ``share_path`` only, if given), in one query per LOCATE_BATCH roots: a join of
        small files asked one query per file, twice on the member (held, then read)."""
        wanted = set(roots)
        query = (
            "SELECT f.root, f.chunks FROM files f "
            if share_path is None
            # CROSS JOIN keeps files the outer loop (through files_by_root): the planner
            # otherwise walks every file of the share.
            else "SELECT f.root, f.chunks FROM files f CROSS JOIN dirs d ON f.dir_id = d.id "
            "CROSS JOIN shares s ON d.share_id = s.id WHERE s.local_path = ? AND "
        )
        if share_path is None:
            query += "WHERE "
        prefixes = list(dict.fromkeys(root[:8] for root in wanted))
        found: dict[bytes, bytes] = {}
        for start in range(0, len(prefixes), LOCATE_BATCH):
            part = prefixes[start : start + LOCATE_BATCH]
            marks = ",".join("?" * len(part))
            args = tuple(part) if share_path is None else (share_path, *part)
            with _guard("reading files"):
                rows = self._conn.execute(
                    f"{query}substr(f.root, 1, 8) IN ({marks})", args
                ).fetchall()
            for root, chunks in rows:
                if root in wanted:
                    found.setdefault(bytes(root), bytes(chunks))
        return found

    def file_trees_many(
        self, roots: Sequence[bytes], share_path: str | None = None
    ) -> dict[ContentHash, dict[ContentHash, bytes]]:
        """``file_tree_nodes`` of each root a file has (see :meth:`file_chunks_many`)."""
        return {
            ContentHash(root): _file_tree(root, packed)
            for root, packed in self.file_chunks_many(roots, share_path).items()
        }

    def file_tree_nodes(self, root: bytes) -> dict[ContentHash, bytes] | None:
        """Every node of a local file's tree by hash (rebuilt from its chunk list)."""
        packed = self.file_chunks(root)
        return None if packed is None else _file_tree(root, packed)

    def put_dir_nodes(self, nodes: Iterable[tuple[bytes, bytes]]) -> None:
        with _guard("storing directory nodes"), self.transaction():
            self._conn.executemany(
                "INSERT OR IGNORE INTO dir_nodes (hash, node) VALUES (?, ?)", nodes
            )

    def dir_node(self, node_hash: bytes) -> bytes | None:
        with _guard("reading directory node"):
            row = self._conn.execute(
                "SELECT node FROM dir_nodes WHERE hash = ?", (node_hash,)
            ).fetchone()
        return None if row is None else bytes(row[0])


def read_chunk(location: ChunkLocation, cid: bytes) -> bytes:
    """Read a located chunk and check it still is what the index says.

    Raises IntegrityError if the file changed since the scan, StorageError if unreadable.
    """
    with ChunkReader() as reader:
        return reader.read(location, cid)


def read_first_intact(cid: bytes, locations: Iterable[ChunkLocation]) -> bytes | None:
    """The chunk from the first location that still holds it (hash-checked), or None."""
    with ChunkReader() as reader:
        return reader.read_first_intact(cid, locations)


class ChunkReader:
    """Reads located chunks, keeping each file open across reads (a big file's thousands of
    chunks cost one open, not one each). Every chunk is hash-checked, except that with
    ``trust_settled`` (a server's reads: what it sends is verified by its receiver) a chunk
    of a file whose stat still shows what the scan recorded with a settled ctime
    (:attr:`ChunkLocation.settled`) is taken as the scan hashed it: the hash was 8% of the
    sender's CPU on the bulk path (issue 13). Bytes read to be written locally are always
    hashed."""

    MAX_OPEN = 64

    def __init__(self, *, trust_settled: bool = False) -> None:
        self._fds: dict[str, int] = {}
        self._trust_settled = trust_settled

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= self.MAX_OPEN:
                self.close()
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            self._fds[path] = fd
        return fd

    def read(self, location: ChunkLocation, cid: bytes) -> bytes:
        """Raises IntegrityError if the file changed since the scan, StorageError if
        unreadable."""
        try:
            fd = self._fd(location.path)
            data = os.pread(fd, location.length, location.offset)
            # The stat is taken after the read: a write that began before the read ended
            # had already moved the ctime (the kernel updates it before the bytes).
            unchanged = (
                self._trust_settled
                and location.settled is not None
                and _settled_identity(os.fstat(fd)) == location.settled
            )
        except OSError as exc:
            raise StorageError(f"cannot read chunk from {location.path}: {exc}") from exc
        if len(data) != location.length or (not unchanged and chunk_id(data) != cid):
            raise IntegrityError(f"{location.path} changed since it was indexed")
        return data

    def read_first_intact(self, cid: bytes, locations: Iterable[ChunkLocation]) -> bytes | None:
        """The chunk from the first location that still holds it, or None.

        A location whose file changed or vanished since the scan is skipped (and logged): a
        stale index costs a fallback, never a wrong byte.
        """
        for location in locations:
            try:
                return self.read(location, cid)
            except (IntegrityError, StorageError) as exc:
                log.info("chunk %s not where the index says: %s", cid.hex()[:12], exc)
        return None


_LOCATION_COLUMNS = (
    "d.path, f.name, c.offset, c.length, f.size, f.mtime_ns, f.settled_ctime_ns, f.inode"
)
_LOCATION_JOINS = "JOIN files f ON f.id = c.file_id JOIN dirs d ON d.id = f.dir_id "


def _location(
    dir_path: str,
    name: str,
    offset: int,
    length: int,
    size: int,
    mtime_ns: int,
    settled_ctime_ns: int | None,
    inode: int,
) -> ChunkLocation:
    """A ChunkLocation from a row of _LOCATION_COLUMNS."""
    settled = None if settled_ctime_ns is None else (size, mtime_ns, settled_ctime_ns, inode)
    return ChunkLocation(os.path.join(dir_path, name), offset, length, settled)


def signed64(value: int) -> int:
    # SQLite integers are signed; some file systems hand out inode numbers >= 2**63.
    return value - (1 << 64) if value >= 1 << 63 else value


def _settled_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode as the index stores it: signed 64 bits)."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, signed64(st.st_ino))


def _file_tree(root: bytes, packed: bytes) -> dict[ContentHash, bytes]:
    """Every node of a file's tree by hash, rebuilt from its stored chunk list, which must
    give ``root`` (else the index is corrupt)."""
    nodes: dict[ContentHash, bytes] = {}
    if build_file_tree(packed, nodes).hash != root:
        raise StorageError(f"index: chunk list of file {root.hex()} does not give its root")
    return nodes
