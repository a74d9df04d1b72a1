"""A folder's records read where they are stored, and paths indexed by directory
(sans-I/O).

A folder of N files holds N signed records. Decoded, one record is a dozen Python objects
(~0.6 KiB); even held encoded, with its path and indexes by hash and directory, ~0.64 KiB.
:class:`RecordSet` keeps none of them: it reads each record from its
:class:`RecordSource` (the folder's SQLite store, indexed by path, hash and directory) when
asked and decodes it then, so a change costs the records it touches and memory per record
is nothing but the cache's few (issue 16).

:class:`DirectoryIndex` lists the paths under a directory without walking every path: a
watcher-driven partial scan compares only the paths in its scope, and finding them must
cost O(scope), not O(folder).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgpack

from p2pfs.errors import LocalProtocolError
from p2pfs.ids import ContentHash
from p2pfs.sync.planner import CONFLICT_MARKER
from p2pfs.sync.records import SignedRecord, record_hash
from p2pfs.sync.versions import DIRECTORY_ROOT, FileVersion

DECODED_CACHE = 1024
"""Records kept decoded (the most recently read): a reconcile reads its paths' records a
few times over (plan, sign, apply)."""
READ_BATCH = 500
"""Paths read per query by the bulk reads (SQLite binds at most 32,766 parameters)."""


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


def record_brief(encoded: bytes) -> tuple[bool, bytes | None, bool, int]:
    """(deleted, root, executable, size) of a stored record, read without building its
    objects."""
    version = msgpack.unpackb(msgpack.unpackb(encoded)[0])
    return version[2], version[3], version[5], version[4]


@dataclass(slots=True)
class RecordCounts:
    """What a folder reports of its records, kept as counts (never a walk)."""

    records: int = 0
    """Every record, tombstones included."""
    files: int = 0
    """Live file records."""
    file_bytes: int = 0
    """The sum of their sizes."""
    directories: int = 0
    """Live directory records."""
    conflict_copies: set[str] = field(default_factory=set)
    """Paths of live conflict copies (few, and listed by ``conflicts``)."""

    def count(self, path: str, encoded: bytes, sign: int) -> None:
        """Count ``path``'s record ``encoded`` in (``sign`` 1) or out (-1)."""
        deleted, root, _executable, size = record_brief(encoded)
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


class RecordSource(Protocol):
    """Where a folder's signed records are (by path; each with its record hash and
    parent directory indexed). The daemon's is the folder's SQLite store
    (``store.folders.SqliteRecords``); :class:`MemoryRecords` is the in-memory one.

    Implementations may be read from any one thread at a time per call (they serialise)."""

    def get(self, path: str) -> bytes | None: ...

    def get_many(self, paths: Collection[str]) -> dict[str, bytes]:
        """The records of those of ``paths`` that have one."""
        ...

    def by_hash(self, digest: ContentHash) -> bytes | None: ...

    def in_directories(self, shallow: Collection[str], deep: Collection[str]) -> set[str]:
        """As :meth:`DirectoryIndex.in_scope`."""
        ...

    def paths(self) -> Iterator[str]:
        """Every path, read in pages: records stored while this is iterated are seen or
        not, without error."""
        ...

    def close(self) -> None: ...


class MemoryRecords:
    """A :class:`RecordSource` in memory (tests, simulations): dicts by path and hash and a
    :class:`DirectoryIndex`."""

    __slots__ = ("_by_hash", "_by_path", "_index")

    def __init__(self) -> None:
        self._by_path: dict[str, bytes] = {}
        self._by_hash: dict[ContentHash, str] = {}
        self._index = DirectoryIndex()

    def put(self, path: str, encoded: bytes) -> bytes | None:
        """Hold ``encoded`` at ``path``; returns the record it replaced."""
        old = self._by_path.get(path)
        if old is None:
            self._index.add(path)
        else:
            self._by_hash.pop(record_hash(old), None)
        self._by_path[path] = encoded
        self._by_hash[record_hash(encoded)] = path
        return old

    def get(self, path: str) -> bytes | None:
        return self._by_path.get(path)

    def get_many(self, paths: Collection[str]) -> dict[str, bytes]:
        return {p: self._by_path[p] for p in paths if p in self._by_path}

    def by_hash(self, digest: ContentHash) -> bytes | None:
        path = self._by_hash.get(digest)
        return None if path is None else self._by_path[path]

    def in_directories(self, shallow: Collection[str], deep: Collection[str]) -> set[str]:
        return self._index.in_scope(shallow, deep)

    def paths(self) -> Iterator[str]:
        return iter(list(self._by_path))

    def close(self) -> None:
        """Nothing to release."""


class RecordSet(Mapping[str, SignedRecord]):
    """The folder's signed records by path, read from a :class:`RecordSource` (the
    folder's SQLite store in the daemon: no Python object per record is kept) and decoded
    when read, with a small cache of the latest. Also answers by record hash (what
    members ask for) and by directory (a partial scan's scope), and keeps the counts the
    folder reports, so none of those walks every record.

    Reading one record is a primary-key lookup (a few microseconds): fine per path on the
    event loop; the bulk reads (:meth:`unmatched`, :meth:`versions_at` of a batch) are for
    a worker thread.

    Records put here were verified (a member's) or made here: reading one back checks no
    signature again (:meth:`SignedRecord.decode_stored`)."""

    __slots__ = ("_decoded", "_source", "counts")

    def __init__(self, source: RecordSource | None = None) -> None:
        self._source: RecordSource = MemoryRecords() if source is None else source
        self._decoded: dict[str, SignedRecord] = {}
        self.counts = RecordCounts()

    @property
    def files(self) -> int:
        return self.counts.files

    @property
    def file_bytes(self) -> int:
        return self.counts.file_bytes

    @property
    def directories(self) -> int:
        return self.counts.directories

    @property
    def conflict_copies(self) -> set[str]:
        return self.counts.conflict_copies

    # -- Mapping --------------------------------------------------------------------------

    def __getitem__(self, path: str) -> SignedRecord:
        record = self._decoded.get(path)
        if record is None:
            encoded = self._source.get(path)
            if encoded is None:
                raise KeyError(path)
            record = SignedRecord.decode_stored(encoded)
            self._keep_decoded(path, record)
        return record

    def _keep_decoded(self, path: str, record: SignedRecord) -> None:
        if len(self._decoded) >= DECODED_CACHE:
            self._decoded.clear()  # cheaper than LRU bookkeeping on every read
        self._decoded[path] = record

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and (
            path in self._decoded or self._source.get(path) is not None
        )

    def __iter__(self) -> Iterator[str]:
        return self._source.paths()

    def __len__(self) -> int:
        return self.counts.records

    # -- the rest -------------------------------------------------------------------------

    def encoded_by_hash(self, digest: ContentHash) -> bytes | None:
        return self._source.by_hash(digest)

    def close(self) -> None:
        """The folder is gone: release the source (its reads end)."""
        self._source.close()

    def put(self, path: str, encoded: bytes, record: SignedRecord | None = None) -> ContentHash:
        """Hold ``encoded`` (the record of ``path``; ``record`` its decoded form, if at
        hand) in this set's :class:`MemoryRecords`; returns its record hash."""
        if not isinstance(self._source, MemoryRecords):
            raise LocalProtocolError("records go to the folder's store, then noted()")
        old = self._source.put(path, encoded)
        return self.noted(path, old, encoded, record)

    def noted(
        self,
        path: str,
        old: bytes | None,
        encoded: bytes,
        record: SignedRecord | None = None,
        digest: ContentHash | None = None,
    ) -> ContentHash:
        """The source now holds ``encoded`` at ``path`` in place of ``old`` (None: the
        path is new): counted, and cached decoded if ``record`` is given. Returns its
        record hash (``digest``, if the caller has it)."""
        if old is None:
            self.counts.records += 1
        else:
            self.counts.count(path, old, -1)
        self.counts.count(path, encoded, 1)
        self._decoded.pop(path, None)
        if record is not None:
            self._keep_decoded(path, record)
        return record_hash(encoded) if digest is None else digest

    def matches(self, path: str, root: bytes, executable: bool) -> bool:
        """Whether ``path`` has a live record of exactly this content and executable bit
        (read without decoding the record)."""
        encoded = self._source.get(path)
        return encoded is not None and _matches(encoded, root, executable)

    def unmatched(self, found: Iterable[tuple[str, bytes, bool]]) -> set[str]:
        """Those of ``found`` ((path, root, executable): a full scan's every file and
        directory) without a live record of exactly that content: read in batches (a
        worker thread's job: ~2 us a path)."""
        differing: set[str] = set()
        batch: dict[str, tuple[bytes, bool]] = {}

        def check() -> None:
            held = self._source.get_many(batch)
            for path, (root, executable) in batch.items():
                encoded = held.get(path)
                if encoded is None or not _matches(encoded, root, executable):
                    differing.add(path)
            batch.clear()

        for path, root, executable in found:
            batch[path] = (root, executable)
            if len(batch) >= READ_BATCH:
                check()
        check()
        return differing

    def live(self, paths: Collection[str]) -> set[str]:
        """Those of ``paths`` with a live record (a file or a directory, not a tombstone),
        read in batches without decoding them."""
        held = self._source.get_many(paths)
        return {path for path, encoded in held.items() if not record_brief(encoded)[0]}

    def file_size(self, path: str) -> int | None:
        """The size of ``path``'s live file record; None if it has none (no record, a
        tombstone or a directory). Read without decoding the record."""
        encoded = self._source.get(path)
        if encoded is None:
            return None
        deleted, root, _executable, size = record_brief(encoded)
        return None if deleted or root == DIRECTORY_ROOT else size

    def in_scope(self, shallow: Collection[str], deep: Collection[str]) -> set[str]:
        return self._source.in_directories(shallow, deep)

    def records_at(self, paths: Collection[str]) -> dict[str, SignedRecord]:
        """The records of those of ``paths`` that have one, decoded (one batch of reads:
        a plan's paths, or a partial scan's scope)."""
        found = {p: r for p in paths if (r := self._decoded.get(p)) is not None}
        rest = [p for p in paths if p not in found]
        for path, encoded in self._source.get_many(rest).items():
            found[path] = SignedRecord.decode_stored(encoded)
        return found

    def versions(self) -> VersionView:
        return VersionView(self)


def _matches(encoded: bytes, root: bytes, executable: bool) -> bool:
    deleted, recorded_root, recorded_executable, _size = record_brief(encoded)
    return not deleted and recorded_root == root and recorded_executable == executable


class KnownVersions(Mapping[str, FileVersion]):
    """A plan's view of the records: the versions of the paths read ahead (``known``,
    read for ``asked``; a path asked without a record has none), any other path read
    from ``records`` (a conflict copy's name, say)."""

    __slots__ = ("_asked", "_known", "_records")

    def __init__(
        self, known: Mapping[str, SignedRecord], asked: Collection[str], records: RecordSet
    ) -> None:
        self._known, self._asked, self._records = known, asked, records

    def __getitem__(self, path: str) -> FileVersion:
        record = self._known.get(path)
        if record is not None:
            return record.version
        if path in self._asked:
            raise KeyError(path)
        return self._records[path].version

    def __contains__(self, path: object) -> bool:
        if path in self._known:
            return True
        return path not in self._asked and path in self._records

    def record(self, path: str) -> SignedRecord | None:
        """The signed record at ``path``, if any."""
        if path in self._known:
            return self._known[path]
        return None if path in self._asked else self._records.get(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


class VersionView(Mapping[str, FileVersion]):
    """The records' versions, read (and decoded) one path at a time. Iterating reads the
    paths in pages from the source: records stored meanwhile are seen or not, no error."""

    paged = True

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
