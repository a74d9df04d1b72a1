"""Turning what the scanner saw on disk into new local versions (sans-I/O).

A file whose content or executable bit differs from its record, or that has no live
record, is a new version by this device; a live record whose file is gone is a delete
(a tombstone), unless the caller says the absence means nothing (an ignored path, or one
the scanner could not read: an unreadable file must never turn into a delete that spreads
to every member). mtime alone is not a change: ``touch`` moves nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass

from p2pfs.errors import LocalProtocolError
from p2pfs.ids import ContentHash
from p2pfs.sync.versions import DIRECTORY_ROOT, FileVersion, VersionVector


@dataclass(frozen=True, slots=True)
class DiskFile:
    """One regular file as the scanner recorded it."""

    path: str
    root: ContentHash
    size: int
    executable: bool
    mtime_ns: int


def directory_entry(path: str) -> DiskFile:
    """A directory as local change detection sees it (mtime is not compared)."""
    return DiskFile(path, DIRECTORY_ROOT, 0, False, 0)


def differs(record: FileVersion | None, disk: DiskFile) -> bool:
    return (
        record is None
        or record.deleted
        or record.root != disk.root
        or record.executable != disk.executable
    )


def iter_local_changes(
    records: Mapping[str, FileVersion],
    disk: Mapping[str, DiskFile],
    device: bytes,
    now_ns: int,
    absence_is_unknown: Callable[[str], bool],
    absent: Collection[str] = (),
    refused: dict[str, str] | None = None,
    same: Callable[[str, bytes, bool], bool] | None = None,
    present: Container[str] | None = None,
) -> Iterator[FileVersion]:
    """New versions (this device's) for every path whose disk state differs from its record,
    made as they are read (a first scan's are every file: the caller takes them in batches).
    Between two reads the caller may store records (the paths of ``records`` are listed when
    the files are done), but must not change ``disk``.

    ``absent``: paths whose record this member stores without holding the content. A file
    found there was not made from that record, so its version is concurrent with it (only
    this device's next counter), never after it; and the file's absence is no delete.

    ``refused``: paths whose change cannot be recorded (a stored vector that cannot be
    bumped) are listed there, path -> why; one such path never stops the others.

    ``same(path, root, executable)``: a cheap check that ``path``'s record is live with
    this content (true only where ``differs`` is false): paths it confirms are passed over
    without reading their records.

    ``present``: every path found on disk, when ``disk`` holds only those that may differ
    from their records (a full scan's unchanged files need no DiskFile each); a record
    whose path is in neither is gone from disk.
    """
    on_disk = disk if present is None else present
    for path, found in disk.items():
        if same is not None and same(path, found.root, found.executable):
            continue
        record = records.get(path)
        if differs(record, found):
            if record is not None and path in absent:
                vector = VersionVector.of({device: record.version.counter(device)})
            else:
                vector = record.version if record is not None else VersionVector.empty()
            try:
                bumped = vector.bump(device)
            except LocalProtocolError as exc:
                if refused is not None:
                    refused[path] = str(exc)
                continue
            yield (
                FileVersion(
                    path,
                    bumped,
                    False,
                    found.root,
                    found.size,
                    found.executable,
                    found.mtime_ns,
                    device,
                )
            )
    # A view that reads its paths in pages (the folder's store: ``paged``) is iterated as
    # it is (a list of 200,000 paths held ~14 MiB); a dict is copied first, as records may
    # be stored between two reads.
    for path in records if getattr(records, "paged", False) else list(records):
        if path in on_disk or path in disk or path in absent or absence_is_unknown(path):
            continue
        record = records[path]
        if record.deleted:
            continue
        try:
            bumped = record.version.bump(device)
        except LocalProtocolError as exc:
            if refused is not None:
                refused[path] = str(exc)
            continue
        yield FileVersion.tombstone(path, bumped, now_ns, device)


def local_changes(
    records: Mapping[str, FileVersion],
    disk: Mapping[str, DiskFile],
    device: bytes,
    now_ns: int,
    absence_is_unknown: Callable[[str], bool],
    absent: Collection[str] = (),
    refused: dict[str, str] | None = None,
    same: Callable[[str, bytes, bool], bool] | None = None,
    present: Container[str] | None = None,
) -> list[FileVersion]:
    """:func:`iter_local_changes`, all at once."""
    return list(
        iter_local_changes(
            records, disk, device, now_ns, absence_is_unknown, absent, refused, same, present
        )
    )


def case_collisions(existing: Iterable[str], incoming: Iterable[str]) -> dict[str, str]:
    """Incoming paths that would land on an existing (or earlier incoming) path on a file
    system that ignores case: incoming path -> the path it collides with.

    Paths are compared after Unicode case folding, whole and by their directories: on such
    a file system ``docs/read.me`` lands on ``Docs/Read.me``, and ``docs/b`` lands in the
    directory ``Docs`` (named as the holder). Among colliding incoming paths the first in
    UTF-8 order keeps its place; an existing path always does (the first in UTF-8 order,
    should two existing ones differ only by case).
    """
    arriving = sorted(incoming, key=lambda p: p.encode("utf-8"))
    if not arriving:
        return {}
    # Only names an incoming path could meet matter: a big folder's other paths are passed
    # over at the cost of folding their first component.
    tops = {path.partition("/")[0].casefold() for path in arriving}
    nearby = [path for path in existing if path.partition("/")[0].casefold() in tops]
    taken: dict[str, str] = {}
    for path in sorted(nearby, key=lambda p: p.encode("utf-8")):
        _take(taken, path)
    collisions: dict[str, str] = {}
    for path in arriving:
        holder = _holder(taken, path)
        if holder is None:
            _take(taken, path)
        else:
            collisions[path] = holder
    return collisions


def _prefixes(path: str) -> list[str]:
    """``a/b/c`` -> ``["a/b/c", "a/b", "a"]``: the path, then its directories."""
    found = [path]
    while "/" in path:
        path = path.rpartition("/")[0]
        found.append(path)
    return found


def _take(taken: dict[str, str], path: str) -> None:
    for prefix in _prefixes(path):
        taken.setdefault(prefix.casefold(), prefix)


def _holder(taken: dict[str, str], path: str) -> str | None:
    for prefix in _prefixes(path):
        holder = taken.get(prefix.casefold())
        if holder is not None and holder != prefix:
            return holder
    return None
