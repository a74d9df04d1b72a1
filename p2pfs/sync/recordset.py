"""A folder's records held compactly, and paths indexed by directory (sans-I/O).

A folder of N files holds N signed records. Decoded, one record is a dozen Python objects
(the version, its vector's tuples, the root, the signature: ~0.6 KiB); :class:`RecordSet`
keeps only each record's encoding (one bytes object, ~0.25 KiB) and decodes a record when
it is read, so a change costs the records it touches and memory stays one object per path.

:class:`DirectoryIndex` lists the paths under a directory without walking every path: a
watcher-driven partial scan compares only the paths in its scope, and finding them must
cost O(scope), not O(folder).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import TypeVar

import msgpack

from p2pfs.ids import ContentHash
from p2pfs.sync.planner import CONFLICT_MARKER
from p2pfs.sync.records import SignedRecord, record_hash
from p2pfs.sync.versions import DIRECTORY_ROOT, FileVersion

V = TypeVar("V")

DECODED_CACHE = 1024
"""Records kept decoded (the most recently read): a reconcile reads its paths' records a
few times over (plan, sign, apply)."""


def parent(path: str) -> str:
    """``a/b/c`` -> ``a/b``; a top-level name's parent is ``""``."""
    return path.rpartition("/")[0]


class DirectoryIndex:
    """Paths grouped by their parent directory: the paths in a scope are found in
    O(directories + paths in scope)."""

    __slots__ = ("_children",)

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self._children: dict[str, set[str]] = {}
        for path in paths:
            self.add(path)

    def add(self, path: str) -> None:
        self._children.setdefault(parent(path), set()).add(path)

    def discard(self, path: str) -> None:
        directory = parent(path)
        children = self._children.get(directory)
        if children is None:
            return
        children.discard(path)
        if not children:
            del self._children[directory]

    def clear(self) -> None:
        self._children.clear()

    def in_scope(self, shallow: Collection[str], deep: Collection[str]) -> set[str]:
        """Paths whose parent is in ``shallow``, paths in ``deep``, and paths below a
        ``deep`` directory (``d/...``; ``""`` as a deep directory covers only itself)."""
        found: set[str] = set()
        for directory in shallow:
            found.update(self._children.get(directory, ()))
        if deep:
            prefixes = tuple(f"{d}/" for d in deep)
            for directory, children in self._children.items():
                if (directory and directory in deep) or directory.startswith(prefixes):
                    found.update(children)
            for path in deep:
                if path in self._children.get(parent(path), ()):
                    found.add(path)
        return found


class IndexedPaths(dict[str, V]):
    """A dict by path that keeps a :class:`DirectoryIndex` of its keys (the folder's
    scanned files: a partial scan drops the states in its scope without a full walk).

    Only item assignment, ``del``, ``pop`` and ``clear`` change it (the others raise)."""

    __slots__ = ("index",)

    def __init__(self, items: Mapping[str, V] | None = None) -> None:
        super().__init__()
        self.index = DirectoryIndex()
        for path, value in (items or {}).items():
            self[path] = value

    def __setitem__(self, path: str, value: V) -> None:
        if path not in self:
            self.index.add(path)
        super().__setitem__(path, value)

    def __delitem__(self, path: str) -> None:
        super().__delitem__(path)
        self.index.discard(path)

    def pop(self, path: str, *default: V) -> V:  # type: ignore[override]
        if path in self:
            self.index.discard(path)
        return super().pop(path, *default)

    def clear(self) -> None:
        super().clear()
        self.index.clear()

    def _unsupported(self, *_args: object, **_kwargs: object) -> None:
        raise TypeError("IndexedPaths changes only by item assignment, del, pop and clear")

    update = setdefault = popitem = __ior__ = _unsupported  # type: ignore[assignment]


def _brief(encoded: bytes) -> tuple[bool, bytes | None, bool, int]:
    """(deleted, root, executable, size) of a stored record, read without building its
    objects."""
    version = msgpack.unpackb(msgpack.unpackb(encoded)[0])
    return version[2], version[3], version[5], version[4]


class RecordSet(Mapping[str, SignedRecord]):
    """The folder's signed records by path: each held as its encoding and decoded when
    read (a small cache keeps the latest). Also answers by record hash (what members ask
    for), and keeps the counts and the per-directory index the folder reports and scans
    by, so none of those walks every record.

    Records put here were verified (a member's) or made here: reading one back checks no
    signature again (:meth:`SignedRecord.decode_stored`)."""

    __slots__ = (
        "_decoded",
        "_encoded",
        "_paths_by_hash",
        "by_directory",
        "conflict_copies",
        "directories",
        "file_bytes",
        "files",
    )

    def __init__(self) -> None:
        self._encoded: dict[str, bytes] = {}
        self._paths_by_hash: dict[ContentHash, str] = {}
        self._decoded: dict[str, SignedRecord] = {}
        self.by_directory = DirectoryIndex()
        self.conflict_copies: set[str] = set()
        """Paths of live conflict copies (few, and listed by ``conflicts``)."""
        self.files = 0
        """Live file records."""
        self.file_bytes = 0
        """The sum of their sizes."""
        self.directories = 0
        """Live directory records."""

    # -- Mapping --------------------------------------------------------------------------

    def __getitem__(self, path: str) -> SignedRecord:
        record = self._decoded.get(path)
        if record is None:
            record = SignedRecord.decode_stored(self._encoded[path])
            self._keep_decoded(path, record)
        return record

    def _keep_decoded(self, path: str, record: SignedRecord) -> None:
        if len(self._decoded) >= DECODED_CACHE:
            self._decoded.clear()  # cheaper than LRU bookkeeping on every read
        self._decoded[path] = record

    def __contains__(self, path: object) -> bool:
        return path in self._encoded

    def __iter__(self) -> Iterator[str]:
        return iter(self._encoded)

    def __len__(self) -> int:
        return len(self._encoded)

    # -- the rest -------------------------------------------------------------------------

    def encoded_by_hash(self, digest: ContentHash) -> bytes | None:
        path = self._paths_by_hash.get(digest)
        return None if path is None else self._encoded[path]

    def put(self, path: str, encoded: bytes, record: SignedRecord | None = None) -> ContentHash:
        """Hold ``encoded`` (the record of ``path``; ``record`` its decoded form, if at
        hand); returns its record hash."""
        digest = record_hash(encoded)
        old = self._encoded.get(path)
        if old is not None:
            self._count(path, old, -1)
            self._paths_by_hash.pop(record_hash(old), None)
        else:
            self.by_directory.add(path)
        self._encoded[path] = encoded
        self._paths_by_hash[digest] = path
        self._count(path, encoded, 1)
        self._decoded.pop(path, None)
        if record is not None:
            self._keep_decoded(path, record)
        return digest

    def _count(self, path: str, encoded: bytes, sign: int) -> None:
        deleted, root, _executable, size = _brief(encoded)
        if deleted:
            return
        if root == DIRECTORY_ROOT:
            self.directories += sign
        else:
            self.files += sign
            self.file_bytes += sign * size
        if CONFLICT_MARKER in path:
            if sign > 0:
                self.conflict_copies.add(path)
            else:
                self.conflict_copies.discard(path)

    def matches(self, path: str, root: bytes, executable: bool) -> bool:
        """Whether ``path`` has a live record of exactly this content and executable bit
        (read without decoding the record: a full rescan asks this of every file)."""
        encoded = self._encoded.get(path)
        if encoded is None:
            return False
        deleted, recorded_root, recorded_executable, _size = _brief(encoded)
        return not deleted and recorded_root == root and recorded_executable == executable

    def file_size(self, path: str) -> int | None:
        """The size of ``path``'s live file record; None if it has none (no record, a
        tombstone or a directory). Read without decoding the record."""
        encoded = self._encoded.get(path)
        if encoded is None:
            return None
        deleted, root, _executable, size = _brief(encoded)
        return None if deleted or root == DIRECTORY_ROOT else size

    def in_scope(self, shallow: Collection[str], deep: Collection[str]) -> set[str]:
        return self.by_directory.in_scope(shallow, deep)

    def versions(self) -> VersionView:
        return VersionView(self)


class VersionView(Mapping[str, FileVersion]):
    """The records' versions, read (and decoded) one path at a time."""

    __slots__ = ("_records",)

    def __init__(self, records: RecordSet) -> None:
        self._records = records

    def __getitem__(self, path: str) -> FileVersion:
        return self._records[path].version

    def __contains__(self, path: object) -> bool:
        return path in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)
