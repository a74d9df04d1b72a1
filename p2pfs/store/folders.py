"""Sync folders in the node's SQLite index: key material, signed records, known members.

Shares the :class:`IndexStore`'s connection (one database file, one writer); callers
serialise, as for the index itself.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from p2pfs.errors import StorageError
from p2pfs.ids import ContentHash
from p2pfs.store.index import IndexStore
from p2pfs.sync.records import path_key, record_hash
from p2pfs.sync.recordset import READ_BATCH, RecordCounts, parent
from p2pfs.sync.versions import Ordering, VersionVector

DERIVE_BATCH = 4096
READER_CACHE_KIB = 4096
"""The record reader's own SQLite page cache (the index connection has 16 MiB)."""


@dataclass(frozen=True, slots=True)
class FolderRow:
    id: int
    folder_id: bytes
    local_path: str
    read_key: bytes
    write_public: bytes
    write_seed: bytes | None
    device: bytes
    created_ns: int


@dataclass(frozen=True, slots=True)
class PeerRow:
    node_id: bytes
    host: str
    port: int
    seen_ns: int


@dataclass(frozen=True, slots=True)
class LoadedRecords:
    counts: RecordCounts
    absent: set[str]
    """Paths of live records held without their content."""
    leaves: bytearray
    """The index tree's leaves in path-key order, packed (see sync.records.PackedLeaves)."""


@contextmanager
def _guard(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"index: {what}: {exc}") from exc


_COLUMNS = "id, folder_id, local_path, read_key, write_public, write_seed, device, created_ns"


class FolderStore:
    def __init__(self, index: IndexStore) -> None:
        self.index = index
        self._conn = index.connection

    def add_folder(
        self,
        folder_id: bytes,
        local_path: str,
        read_key: bytes,
        write_public: bytes,
        write_seed: bytes | None,
        device: bytes,
        created_ns: int,
    ) -> FolderRow:
        with _guard("adding folder"), self.index.transaction():
            taken = self._conn.execute(
                "SELECT local_path FROM folders WHERE folder_id = ? OR local_path = ?",
                (folder_id, local_path),
            ).fetchone()
            if taken is not None:
                raise StorageError(f"{taken[0]} is already a sync folder (or this one's path)")
            self._conn.execute(
                "INSERT INTO folders (folder_id, local_path, read_key, write_public, "
                "write_seed, device, created_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (folder_id, local_path, read_key, write_public, write_seed, device, created_ns),
            )
        row = self.folder_by_path(local_path)
        assert row is not None
        return row

    def folders(self) -> list[FolderRow]:
        with _guard("listing folders"):
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM folders ORDER BY id").fetchall()
        return [FolderRow(*row) for row in rows]

    def folder_by_path(self, local_path: str) -> FolderRow | None:
        with _guard("reading folder"):
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM folders WHERE local_path = ?", (local_path,)
            ).fetchone()
        return None if row is None else FolderRow(*row)

    def set_paused(self, folder: int, paused: bool) -> None:
        with _guard("pausing folder"), self.index.transaction():
            self._conn.execute("UPDATE folders SET paused = ? WHERE id = ?", (int(paused), folder))

    def paused_folders(self) -> set[int]:
        with _guard("listing paused folders"):
            rows = self._conn.execute("SELECT id FROM folders WHERE paused").fetchall()
        return {row[0] for row in rows}

    def remove_folder(self, folder: int) -> None:
        with _guard("removing folder"), self.index.transaction():
            self._conn.execute("DELETE FROM folder_records WHERE folder = ?", (folder,))
            self._conn.execute("DELETE FROM folder_peers WHERE folder = ?", (folder,))
            self._conn.execute("DELETE FROM folders WHERE id = ?", (folder,))

    def load_records(self, folder: int) -> LoadedRecords:
        """What a folder keeps in memory of its records, read in one pass (a load): the
        counts, the paths held absent, and the index tree's leaves in path-key order,
        packed (64 bytes a record; streamed from an index, so nothing per record is made).
        Rows written before schema 5 get their hash, key and directory first."""
        counts = RecordCounts()
        absent: set[str] = set()
        leaves = bytearray()
        with _guard("reading folder records"), self.index.transaction():
            self._derive_columns(folder)
            for path, encoded, is_absent in self._conn.execute(
                "SELECT path, record, absent FROM folder_records WHERE folder = ?", (folder,)
            ):
                counts.records += 1
                counts.count(path, encoded, 1)
                if is_absent:
                    absent.add(path)
            for key, digest in self._conn.execute(
                "SELECT key, hash FROM folder_records WHERE folder = ? ORDER BY key", (folder,)
            ):
                leaves += key
                leaves += digest
        return LoadedRecords(counts, absent, leaves)

    def tree_leaves(self, folder: int) -> bytearray:
        """The index tree's leaves (path key, record hash) in key order, packed."""
        leaves = bytearray()
        with _guard("reading folder records"):
            for key, digest in self._conn.execute(
                "SELECT key, hash FROM folder_records WHERE folder = ? ORDER BY key", (folder,)
            ):
                leaves += key
                leaves += digest
        return leaves

    def _derive_columns(self, folder: int) -> None:
        """Fill hash, key and dir where they are missing (rows older than schema 5)."""
        while rows := self._conn.execute(
            "SELECT path, record FROM folder_records WHERE folder = ? AND hash IS NULL "
            f"LIMIT {DERIVE_BATCH}",
            (folder,),
        ).fetchall():
            self._conn.executemany(
                "UPDATE folder_records SET hash = ?, key = ?, dir = ? "
                "WHERE folder = ? AND path = ?",
                [
                    (record_hash(encoded), path_key(path), parent(path), folder, path)
                    for path, encoded in rows
                ],
            )

    def put_records(
        self, folder: int, records: Iterable[tuple[str, bytes, bool]]
    ) -> list[tuple[bytes | None, bytes, ContentHash]]:
        """Store (path, signed record, absent) rows, in one transaction; returns, for each,
        the record it replaced (None: a new path), its path key and its record hash."""
        replaced = []
        with _guard("writing folder records"), self.index.transaction():
            # Row by row: a later row for a path replaces an earlier one of the same call.
            for path, encoded, absent in records:
                old = self._conn.execute(
                    "SELECT record FROM folder_records WHERE folder = ? AND path = ?",
                    (folder, path),
                ).fetchone()
                key, digest = path_key(path), record_hash(encoded)
                replaced.append((None if old is None else bytes(old[0]), key, digest))
                self._conn.execute(
                    "INSERT OR REPLACE INTO folder_records "
                    "(folder, path, record, absent, hash, key, dir) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (folder, path, encoded, int(absent), digest, key, parent(path)),
                )
        return replaced

    def note_vectors(self, link: int, vectors: Iterable[tuple[str, VersionVector]]) -> str | None:
        """A member's link (``link``: its serial) sent these (path, vector): the first path
        whose vector is older than one the link sent before, if any (then nothing is kept);
        else each is kept as the link's latest for its path. Kept in a temporary table of
        the index connection (gone with it): a dict by path cost ~0.16 KiB a record."""
        rows = []
        with _guard("checking a member's vectors"), self.index.transaction():
            self._conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS link_vectors (link INTEGER NOT NULL, "
                "path TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (link, path)) "
                "WITHOUT ROWID"
            )
            for path, vector in vectors:
                seen = self._conn.execute(
                    "SELECT vector FROM temp.link_vectors WHERE link = ? AND path = ?",
                    (link, path),
                ).fetchone()
                if seen is not None:
                    before = VersionVector.decode_untrusted(bytes(seen[0]))
                    if vector.compare(before) is Ordering.BEFORE:
                        return path
                rows.append((link, path, vector.encode()))
            self._conn.executemany(
                "INSERT OR REPLACE INTO temp.link_vectors (link, path, vector) VALUES (?, ?, ?)",
                rows,
            )
        return None

    def forget_vectors(self, link: int) -> None:
        """The link ended: what it sent is forgotten."""
        with _guard("forgetting a member's vectors"), self.index.transaction():
            exists = self._conn.execute(
                "SELECT 1 FROM temp.sqlite_master WHERE name = 'link_vectors'"
            ).fetchone()
            if exists is not None:
                self._conn.execute("DELETE FROM temp.link_vectors WHERE link = ?", (link,))

    def record_source(self, folder: int) -> SqliteRecords:
        """The folder's records, read on a connection of their own (see SqliteRecords)."""
        return SqliteRecords(self.index.path, folder)

    def held_roots(self, share_path: str, roots: Iterable[bytes]) -> set[bytes]:
        """Those of ``roots`` that a file of the share at ``share_path`` (its real path, as
        the scan keeps it) has as its tree root, per the scan index: what a folder serves
        (no other share's files). One indexed lookup each."""
        held: set[bytes] = set()
        with _guard("reading folder files"):
            for root in roots:
                row = self._conn.execute(
                    "SELECT 1 FROM files JOIN dirs ON files.dir_id = dirs.id "
                    "JOIN shares ON dirs.share_id = shares.id "
                    "WHERE substr(files.root, 1, 8) = ? AND files.root = ? "
                    "AND shares.local_path = ? LIMIT 1",
                    (root[:8], root, share_path),
                ).fetchone()
                if row is not None:
                    held.add(root)
        return held

    def peers(self, folder: int) -> list[PeerRow]:
        with _guard("reading folder peers"):
            rows = self._conn.execute(
                "SELECT node_id, host, port, seen_ns FROM folder_peers WHERE folder = ? "
                "ORDER BY seen_ns DESC",
                (folder,),
            ).fetchall()
        return [PeerRow(*row) for row in rows]

    def forget_peers_before(self, folder: int, cutoff_ns: int) -> int:
        """Drop members not met (authenticated) since ``cutoff_ns``; returns how many."""
        with _guard("expiring folder peers"), self.index.transaction():
            cursor = self._conn.execute(
                "DELETE FROM folder_peers WHERE folder = ? AND seen_ns < ?", (folder, cutoff_ns)
            )
        return cursor.rowcount

    def put_peer(self, folder: int, node_id: bytes, host: str, port: int, seen_ns: int) -> None:
        with _guard("writing folder peer"), self.index.transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO folder_peers (folder, node_id, host, port, seen_ns) "
                "VALUES (?, ?, ?, ?, ?)",
                (folder, node_id, host, port, seen_ns),
            )


class SqliteRecords:
    """A folder's records read from the index database (a ``RecordSource``), on a
    read-only connection of its own: a read on the event loop never waits for the index
    connection's writer (WAL: readers see what was committed), and each call holds a lock
    only for its own statements, so a worker thread's bulk read interleaves with the event
    loop's single ones. Writes go through :meth:`FolderStore.put_records`."""

    def __init__(self, path: str, folder: int) -> None:
        self._folder = folder
        self._lock = threading.Lock()
        with _guard("opening the folder's record reader"):
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA query_only=ON")
            self._conn.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")

    def close(self) -> None:
        with self._lock, _guard("closing the folder's record reader"):
            self._conn.close()

    def get(self, path: str) -> bytes | None:
        with self._lock, _guard("reading a folder record"):
            row = self._conn.execute(
                "SELECT record FROM folder_records WHERE folder = ? AND path = ?",
                (self._folder, path),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(self, paths: Collection[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        wanted = list(paths)
        for start in range(0, len(wanted), READ_BATCH):
            batch = wanted[start : start + READ_BATCH]
            marks = ",".join("?" * len(batch))
            with self._lock, _guard("reading folder records"):
                rows = self._conn.execute(
                    "SELECT path, record FROM folder_records "
                    f"WHERE folder = ? AND path IN ({marks})",
                    (self._folder, *batch),
                ).fetchall()
            found.update((path, bytes(record)) for path, record in rows)
        return found

    def by_hash(self, digest: ContentHash) -> bytes | None:
        with self._lock, _guard("reading a folder record by hash"):
            row = self._conn.execute(
                "SELECT record FROM folder_records WHERE hash = ? AND folder = ?",
                (digest, self._folder),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def in_directories(self, shallow: Collection[str], deep: Collection[str]) -> set[str]:
        found: set[str] = set()
        with self._lock, _guard("reading folder paths by directory"):
            for directory in shallow:
                found.update(
                    path
                    for (path,) in self._conn.execute(
                        "SELECT path FROM folder_records WHERE folder = ? AND dir = ?",
                        (self._folder, directory),
                    )
                )
            for directory in deep:
                # d itself, and every path below it: 'd/' <= path < 'd0' ('0' follows '/')
                found.update(
                    path
                    for (path,) in self._conn.execute(
                        "SELECT path FROM folder_records WHERE folder = ? AND "
                        "(path = ? OR (path >= ? AND path < ?))",
                        (self._folder, directory, f"{directory}/", f"{directory}0")
                        if directory
                        else (self._folder, directory, "", ""),
                    )
                )
        return found

    def paths(self) -> Iterator[str]:
        after = ""  # no record has the empty path
        while True:
            with self._lock, _guard("listing folder records"):
                rows = self._conn.execute(
                    "SELECT path FROM folder_records WHERE folder = ? AND path > ? "
                    "ORDER BY path LIMIT ?",
                    (self._folder, after, READ_BATCH),
                ).fetchall()
            if not rows:
                return
            for (path,) in rows:
                yield path
            after = rows[-1][0]
