"""Version vectors and the per-file version record that folder members exchange.

A version vector maps each device that ever changed a file to how many changes it made.
Comparing two vectors says whether one version saw the other (BEFORE/AFTER), whether they
are the same (EQUAL), or whether they were made independently (CONCURRENT: a conflict, or
a delete racing an edit). Merging takes the per-device maximum: the least vector that saw
both, which is what a member records after it has reconciled two versions.

Everything here is pure: the planner and the wire both use these values, and the daemon
persists them. The wire form is canonical (one encoding per value, checked on decode), so
a signature or MAC over an index update covers exactly one meaning.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pfs.content.names import validate_relative_path
from p2pfs.content.tree import MAX_SIZE
from p2pfs.errors import InvalidNameError, LocalProtocolError, RemoteProtocolError
from p2pfs.ids import HASH_LEN, ContentHash, content_hash_untrusted

DEVICE_ID_LEN = 32
"""A device id: 32 bytes, one per folder membership (see p2pfs.sync.keys.device_id)."""
MAX_DEVICES = 1024
"""Entries a vector may hold: a folder with more writers than this is not one we accept."""
MAX_COUNTER = (1 << 63) - 1
"""Counters are non-negative int64 so every implementation (and SQLite) can hold them."""
MAX_WIRE_COUNTER = 1 << 62
"""Counters a peer may send: far above any real count (one edit a nanosecond for 146
years), with 2^62 bumps of headroom below MAX_COUNTER, so a record no member can bump past
(the old `bump` overflow that stopped a folder's change recording) never gets in."""
MAX_RECORD_DEVICES = 256
"""Entries a vector made here may hold (records are compacted to this when made). Well
below MAX_DEVICES, so merging what any member accepted and adding one device always
yields a record every member accepts."""
MIN_MTIME_NS = -(1 << 63)
MAX_MTIME_NS = (1 << 63) - 1
MAX_PATH_BYTES = 64 * 1024
MAX_FILE_VERSION_BYTES = MAX_PATH_BYTES + MAX_DEVICES * (DEVICE_ID_LEN + 16) + 256
DIRECTORY_ROOT = ContentHash(bytes.fromhex("d1" * 32))
"""The root a live record carries for a directory (no file tree has it: a tree root is a
keyed BLAKE3 hash). Directories are records so that empty ones sync and deletes of whole
trees travel; their content is their files' own records."""
"""Bound on one encoded FileVersion, checked before msgpack allocates anything."""


class Ordering(enum.Enum):
    """How one version vector relates to another (``a.compare(b)`` reads "a is ... b")."""

    EQUAL = "equal"
    BEFORE = "before"
    AFTER = "after"
    CONCURRENT = "concurrent"


def short_device(device: bytes, length: int = 7) -> str:
    """The first characters of a device's NodeId text (lowercase base32), as users see it.

    Seven characters, like Syncthing's short device id: enough to tell a folder's members
    apart in a conflict copy's name, never used for identity decisions.
    """
    return base64.b32encode(device).decode("ascii").rstrip("=").lower()[:length]


def _check_device(device: object) -> bytes:
    if not isinstance(device, bytes) or len(device) != DEVICE_ID_LEN:
        raise LocalProtocolError(f"a device id is {DEVICE_ID_LEN} bytes")
    return device


@dataclass(frozen=True, slots=True)
class VersionVector(Mapping[bytes, int]):
    """An immutable map device id -> change counter; absent devices count 0.

    Stored as pairs sorted by device with no zero counters, so equal vectors are equal
    values (and hash and encode the same). Build with :meth:`of` or :meth:`empty`.
    """

    entries: tuple[tuple[bytes, int], ...] = ()

    def __post_init__(self) -> None:
        previous: bytes | None = None
        for device, counter in self.entries:
            _check_device(device)
            if type(counter) is not int or not 1 <= counter <= MAX_COUNTER:
                raise LocalProtocolError(f"counter {counter!r} out of range")
            if previous is not None and previous >= device:
                raise LocalProtocolError("version vector entries out of order or repeated")
            previous = device

    @classmethod
    def empty(cls) -> VersionVector:
        return cls(())

    @classmethod
    def of(cls, counters: Mapping[bytes, int]) -> VersionVector:
        """Normalise any mapping (zero counters dropped, devices sorted)."""
        return cls(tuple(sorted((d, c) for d, c in counters.items() if c != 0)))

    # Mapping protocol: absent devices read as 0 via get(); [] raises KeyError like a dict.
    def __getitem__(self, device: bytes) -> int:
        for key, counter in self.entries:
            if key == device:
                return counter
        raise KeyError(device)

    def __iter__(self) -> Iterator[bytes]:
        return (device for device, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def counter(self, device: bytes) -> int:
        return dict(self.entries).get(device, 0)

    def bump(self, device: bytes) -> VersionVector:
        """The vector of a change made by ``device`` on top of this version (compacted)."""
        _check_device(device)
        counters = dict(self.entries)
        value = counters.get(device, 0) + 1
        if value > MAX_COUNTER:
            raise LocalProtocolError("version counter overflow")
        counters[device] = value
        return VersionVector.of(counters).compact({device})

    def compact(self, keep: set[bytes], cap: int = MAX_RECORD_DEVICES) -> VersionVector:
        """At most ``cap`` entries: the devices in ``keep`` and then the largest counters
        (ties: the larger device id); the smallest counters of other devices are dropped.

        Sound for the planner (protocol/SYNC.md, Vectors): dropping entries only makes a
        vector smaller, so it can turn AFTER into CONCURRENT (a conflict copy instead of an
        overwrite: nothing lost), never CONCURRENT into AFTER; and ``keep`` holds the device
        whose new counter makes the record, which no version that has not seen it can match,
        so nothing older can ever be AFTER or EQUAL to it. Deterministic, so every member
        compacts a merge to the same vector.
        """
        if len(self.entries) <= cap:
            return self
        kept = [(d, c) for d, c in self.entries if d in keep]
        others = sorted(((c, d) for d, c in self.entries if d not in keep), reverse=True)[
            : max(cap - len(kept), 0)
        ]
        return VersionVector.of({**dict(kept), **{d: c for c, d in others}})

    def merge(self, other: VersionVector) -> VersionVector:
        """The per-device maximum: the least version that has seen both."""
        counters = dict(self.entries)
        for device, counter in other.entries:
            counters[device] = max(counters.get(device, 0), counter)
        return VersionVector.of(counters)

    def compare(self, other: VersionVector) -> Ordering:
        mine = dict(self.entries)
        theirs = dict(other.entries)
        le = all(counter <= theirs.get(device, 0) for device, counter in mine.items())
        ge = all(counter <= mine.get(device, 0) for device, counter in theirs.items())
        if le and ge:
            return Ordering.EQUAL
        if le:
            return Ordering.BEFORE
        if ge:
            return Ordering.AFTER
        return Ordering.CONCURRENT

    def to_wire(self) -> list[list[Any]]:
        return [[device, counter] for device, counter in self.entries]

    @classmethod
    def from_wire_untrusted(cls, value: object) -> VersionVector:
        """Accept only the canonical form: sorted distinct devices, counters >= 1."""
        if not isinstance(value, list):
            raise RemoteProtocolError("version vector: expected an array")
        if len(value) > MAX_DEVICES:
            raise RemoteProtocolError(f"version vector: more than {MAX_DEVICES} entries")
        entries = []
        for item in value:
            if not isinstance(item, list) or len(item) != 2:
                raise RemoteProtocolError("version vector: expected [device, counter] pairs")
            device, counter = item
            if not isinstance(device, bytes) or len(device) != DEVICE_ID_LEN:
                raise RemoteProtocolError("version vector: bad device id")
            if type(counter) is not int or not 1 <= counter <= MAX_WIRE_COUNTER:
                raise RemoteProtocolError(f"version vector: bad counter {counter!r}")
            entries.append((device, counter))
        try:
            return cls(tuple(entries))
        except LocalProtocolError as exc:  # order/repeat checks live in __post_init__
            raise RemoteProtocolError(f"version vector: {exc}") from exc

    def encode(self) -> bytes:
        return _pack(self.to_wire())

    @classmethod
    def decode_untrusted(cls, data: bytes) -> VersionVector:
        value = _unpack_untrusted(data, "version vector", MAX_DEVICES * (DEVICE_ID_LEN + 16) + 16)
        vector = cls.from_wire_untrusted(value)
        # msgpack allows wider integer encodings; one value must have one encoding.
        if vector.encode() != data:
            raise RemoteProtocolError("version vector: encoding is not canonical")
        return vector

    def __repr__(self) -> str:
        inner = ", ".join(f"{short_device(d)}:{c}" for d, c in self.entries)
        return f"VersionVector({{{inner}}})"


@dataclass(frozen=True, slots=True)
class FileVersion:
    """What a member records about one path: which version it holds and what it contains.

    A tombstone (``deleted``) has no root, size 0 and no executable bit: it exists so the
    delete can travel and be compared like any other change. ``modified_by`` is the device
    whose change this content is; ``mtime_ns`` is that change's file mtime, carried so
    conflict resolution and the conflict copy's name agree on every member.
    """

    path: str
    version: VersionVector
    deleted: bool
    root: ContentHash | None
    size: int
    executable: bool
    mtime_ns: int
    modified_by: bytes

    def __post_init__(self) -> None:
        validate_relative_path(self.path)
        _check_device(self.modified_by)
        if self.deleted != (self.root is None):
            raise LocalProtocolError("a tombstone has no root and a live file has one")
        if self.root is not None and len(self.root) != HASH_LEN:
            raise LocalProtocolError(f"a root is {HASH_LEN} bytes")
        if self.deleted and (self.size or self.executable):
            raise LocalProtocolError("a tombstone has size 0 and no executable bit")
        if not 0 <= self.size <= MAX_SIZE:
            raise LocalProtocolError(f"size {self.size} out of range")
        if not MIN_MTIME_NS <= self.mtime_ns <= MAX_MTIME_NS:
            raise LocalProtocolError(f"mtime {self.mtime_ns} out of range")
        # The device that made the change must appear in its vector, else the vector could
        # not tell this change from an older one by the same device.
        if self.version.counter(self.modified_by) == 0:
            raise LocalProtocolError("modified_by is missing from the version vector")

    @property
    def is_directory(self) -> bool:
        return self.root == DIRECTORY_ROOT

    @classmethod
    def tombstone(
        cls, path: str, version: VersionVector, mtime_ns: int, modified_by: bytes
    ) -> FileVersion:
        return cls(path, version, True, None, 0, False, mtime_ns, modified_by)

    def to_wire(self) -> list[Any]:
        return [
            self.path,
            self.version.to_wire(),
            self.deleted,
            self.root,
            self.size,
            self.executable,
            self.mtime_ns,
            self.modified_by,
        ]

    @classmethod
    def from_wire_untrusted(cls, value: object) -> FileVersion:
        if not isinstance(value, list) or len(value) != 8:
            raise RemoteProtocolError("file version: expected 8 fields")
        path, vector, deleted, root, size, executable, mtime_ns, modified_by = value
        if not isinstance(path, str) or len(path) > MAX_PATH_BYTES:
            raise RemoteProtocolError("file version: path must be a bounded string")
        try:
            validate_relative_path(path)
        except InvalidNameError as exc:
            raise RemoteProtocolError(f"file version: {exc}") from exc
        if type(deleted) is not bool or type(executable) is not bool:
            raise RemoteProtocolError("file version: flags must be booleans")
        if root is not None:
            root = content_hash_untrusted(root)
        for name, number in (("size", size), ("mtime", mtime_ns)):
            if type(number) is not int:
                raise RemoteProtocolError(f"file version: {name} must be an integer")
        if not isinstance(modified_by, bytes):
            raise RemoteProtocolError("file version: modified_by must be bytes")
        version = VersionVector.from_wire_untrusted(vector)
        try:
            return cls(path, version, deleted, root, size, executable, mtime_ns, modified_by)
        except LocalProtocolError as exc:  # the invariants of __post_init__, broken remotely
            raise RemoteProtocolError(f"file version {path!r}: {exc}") from exc

    def encode(self) -> bytes:
        return _pack(self.to_wire())

    @classmethod
    def decode_stored(cls, data: bytes) -> FileVersion:
        """A version this node encoded or checked before storing it: built without the
        checks of :meth:`decode_untrusted` (a record read back costs ~3 us, not ~20)."""
        path, vector, deleted, root, size, executable, mtime_ns, modified_by = msgpack.unpackb(
            data, raw=False
        )
        entries = object.__new__(VersionVector)
        object.__setattr__(entries, "entries", tuple((d, c) for d, c in vector))
        version = object.__new__(cls)
        for name, value in (
            ("path", path),
            ("version", entries),
            ("deleted", deleted),
            ("root", root),
            ("size", size),
            ("executable", executable),
            ("mtime_ns", mtime_ns),
            ("modified_by", modified_by),
        ):
            object.__setattr__(version, name, value)
        return version

    @classmethod
    def decode_untrusted(cls, data: bytes) -> FileVersion:
        value = _unpack_untrusted(data, "file version", MAX_FILE_VERSION_BYTES)
        version = cls.from_wire_untrusted(value)
        if version.encode() != data:
            raise RemoteProtocolError("file version: encoding is not canonical")
        return version


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack_untrusted(data: bytes, what: str, limit: int) -> object:
    if not isinstance(data, bytes):
        raise RemoteProtocolError(f"{what}: expected bytes")
    if len(data) > limit:
        raise RemoteProtocolError(f"{what}: {len(data)} bytes exceeds bound {limit}")
    try:
        value: object = msgpack.unpackb(
            data,
            raw=False,
            max_bin_len=DEVICE_ID_LEN,
            max_str_len=MAX_PATH_BYTES,
            max_array_len=MAX_DEVICES,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # Covers ExtraData, FormatError, StackError, OutOfData and limits exceeded.
        raise RemoteProtocolError(f"{what}: malformed msgpack: {exc}") from exc
    return value
