"""Sync folders in the node's SQLite index: key material, signed records, known members.

Shares the :class:`IndexStore`'s connection (one database file, one writer); callers
serialise, as for the index itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from p2pfs.errors import StorageError
from p2pfs.store.index import IndexStore


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

    def records(self, folder: int) -> dict[str, tuple[bytes, bool]]:
        """path -> (signed record, absent: a live record whose content this node lacks)."""
        with _guard("reading folder records"):
            rows = self._conn.execute(
                "SELECT path, record, absent FROM folder_records WHERE folder = ?", (folder,)
            ).fetchall()
        return {path: (bytes(record), bool(absent)) for path, record, absent in rows}

    def put_records(self, folder: int, records: Iterable[tuple[str, bytes, bool]]) -> None:
        with _guard("writing folder records"), self.index.transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO folder_records (folder, path, record, absent) "
                "VALUES (?, ?, ?, ?)",
                [(folder, path, record, int(absent)) for path, record, absent in records],
            )

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
