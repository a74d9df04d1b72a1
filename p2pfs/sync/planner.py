"""The sync planner: for each path, what a member does with a peer's version of it.

``sync/reconcile.py`` applies these rules to a whole reconcile, as the daemon runs it.

Two members that hold different versions of a path each call :func:`plan_file` with their
own version as ``local`` and the other's as ``remote``. The decision rests on one symmetric
function, :func:`resolve`, so both members reach the same record for the path and the same
conflict copy, whichever of them plans first; that is what makes all members converge.

Rules (the SPEC's conflict rules):

- A version that has seen the other (vector AFTER) wins outright: its content or its
  delete is taken as is.
- Concurrent versions (neither vector saw the other) are reconciled into a record whose
  vector is the merge of both, so it is AFTER each and the conflict is never seen again:
  - a live file beats a tombstone: a delete never removes a concurrent edit;
  - two tombstones stay a tombstone;
  - two live files with the same content root: one file, no copy;
  - two live files with different roots: a conflict. The winner (newer mtime; ties by the
    larger device id, then by the larger encoded record) keeps the path; the loser survives
    as ``name.sync-conflict-YYYYMMDD-HHMMSS-<device>.ext`` (its mtime in UTC, the first 7
    characters of its device's NodeId text).
- A local file the scanner saw change since its version was recorded is never touched:
  the plan is KEEP until the scanner records the change as a new version (which is then
  AFTER or CONCURRENT with the remote one, and planned again).

Equal vectors with different records can only come from a buggy or forged peer; they are
reconciled like concurrent ones, so no content is dropped and members still converge.
"""

from __future__ import annotations

import datetime
import enum
import re
import unicodedata
from dataclasses import dataclass, replace

from p2pfs.content.names import MAX_NAME_BYTES, validate_relative_path
from p2pfs.errors import LocalProtocolError
from p2pfs.sync.versions import FileVersion, Ordering, VersionVector, short_device

CONFLICT_MARKER = ".sync-conflict-"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class ActionKind(enum.Enum):
    """What happens on disk. (What the index records is :attr:`Action.record`.)"""

    KEEP = "keep"  # nothing on disk (the index may still record a merged vector or tombstone)
    FETCH = "fetch"  # make the file match ``record``: content, executable bit, mtime
    DELETE = "delete"  # remove the local file (into the versions directory)
    CONFLICT = "conflict"  # winner at ``path``, loser at ``conflict_copy.path``


@dataclass(frozen=True, slots=True)
class Action:
    """The plan for one path.

    ``record`` is what the local index holds for ``path`` once the action is applied (None
    only when neither side has a version); it can differ from the local version even for
    KEEP. For CONFLICT, ``conflict_copy`` is the loser's content under its new name: the
    member holding the loser locally renames it there, the other fetches it.
    """

    kind: ActionKind
    path: str
    record: FileVersion | None
    conflict_copy: FileVersion | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of reconciling two versions of one path: the same on every member."""

    record: FileVersion
    conflict_copy: FileVersion | None = None


def winner_key(version: FileVersion) -> tuple[int, bytes, bytes]:
    # mtime first (the edit the user made last is the one they most likely want at the
    # path), then device id, then the whole encoded record, so distinct records never tie.
    return (version.mtime_ns, version.modified_by, version.encode())


def concurrent_winner(a: FileVersion, b: FileVersion) -> FileVersion:
    """Which of two concurrent versions keeps the path: a live file beats a tombstone (a
    delete never removes a concurrent edit), else the larger :func:`winner_key`."""
    if a.deleted != b.deleted:
        return b if a.deleted else a
    return a if winner_key(a) > winner_key(b) else b


def resolve(a: FileVersion, b: FileVersion) -> Resolution:
    """Reconcile two versions of the same path. Symmetric: ``resolve(a, b) == resolve(b, a)``."""
    if a.path != b.path:
        raise LocalProtocolError(f"resolving different paths {a.path!r} and {b.path!r}")
    if a == b:
        return Resolution(a)
    order = a.version.compare(b.version)
    if order is Ordering.AFTER:
        return Resolution(a)
    if order is Ordering.BEFORE:
        return Resolution(b)
    # Compacted, keeping both edits' devices: their counters are what tell every older
    # version apart from this record.
    merged = a.version.merge(b.version).compact({a.modified_by, b.modified_by})
    winner = concurrent_winner(a, b)
    record = replace(winner, version=merged)
    if a.deleted != b.deleted:
        return Resolution(record)
    loser = b if winner is a else a
    if winner.deleted or winner.root == loser.root:
        return Resolution(record)
    return Resolution(record, conflict_copy(loser))


def conflict_copy(loser: FileVersion) -> FileVersion:
    """The loser of a conflict, renamed.

    Its vector holds only the loser's own (device, counter): that pair names one edit, so
    every member derives the identical record for the copy, whatever vectors the loser had
    gathered by the time that member resolved the conflict.
    """
    device = loser.modified_by
    return replace(
        loser,
        path=conflict_name(loser.path, loser.mtime_ns, device),
        version=VersionVector.of({device: loser.version.counter(device)}),
    )


def conflict_name(path: str, mtime_ns: int, device: bytes) -> str:
    """``dir/name.sync-conflict-YYYYMMDD-HHMMSS-<device>.ext`` for ``dir/name.ext``.

    The time is ``mtime_ns`` in UTC (so every member writes the same name); the stem is
    shortened if the name would exceed the file-system limit on one component.
    """
    directory, slash, name = path.rpartition("/")
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    when = _EPOCH + datetime.timedelta(microseconds=mtime_ns // 1000)
    stamp = (
        f"{when.year:04d}{when.month:02d}{when.day:02d}-"
        f"{when.hour:02d}{when.minute:02d}{when.second:02d}"
    )
    marker = f"{CONFLICT_MARKER}{stamp}-{short_device(device)}"
    if len((marker + ext).encode("utf-8")) > MAX_NAME_BYTES // 2:
        stem, ext = name, ""  # an absurdly long "extension" is just part of the name
    stem = _truncate_utf8(stem, MAX_NAME_BYTES - len((marker + ext).encode("utf-8")))
    return validate_relative_path(f"{directory}{slash}{stem}{marker}{ext}")


def conflict_original(copy_path: str) -> str:
    """The path a conflict copy was made from (``dir/name.ext`` for
    ``dir/name.sync-conflict-....ext``); a path without the marker is its own."""
    directory, slash, name = copy_path.rpartition("/")
    stem, marker, rest = name.partition(CONFLICT_MARKER)
    if not marker:
        return copy_path
    ext = rest[rest.find(".") :] if "." in rest else ""
    return f"{directory}{slash}{stem}{ext}"


def conflict_device(copy_path: str) -> str | None:
    """The device tag in a conflict copy's name (``short_device`` of the device whose
    version it keeps), or None for a path that is not named as a conflict copy."""
    name = copy_path.rpartition("/")[2]
    _stem, marker, rest = name.partition(CONFLICT_MARKER)
    found = _CONFLICT_STAMP.match(rest) if marker else None
    return found.group(1) if found else None


_CONFLICT_STAMP = re.compile(r"[0-9]{8}-[0-9]{6}-([a-z2-7]{7})")


def _truncate_utf8(text: str, limit: int) -> str:
    # Drop whole code points, then renormalise: a cut can leave a sequence NFC would fold.
    while len(text.encode("utf-8")) > limit:
        text = unicodedata.normalize("NFC", text[:-1])
    return text


def plan_file(
    local: FileVersion | None, remote: FileVersion | None, *, local_changed: bool = False
) -> Action:
    """Decide what to do with ``remote`` (a peer's version) given ours.

    ``local_changed``: the scanner saw the local file (or an untracked file at this path)
    differ from ``local``; such a file is never overwritten or deleted by a plan.
    """
    path = _path_of(local, remote)
    if local_changed:
        return Action(ActionKind.KEEP, path, local, reason="local change not yet recorded")
    if remote is None or local == remote:
        return Action(ActionKind.KEEP, path, local)
    if local is None:
        if remote.deleted:
            return Action(ActionKind.KEEP, path, remote, reason="record remote tombstone")
        return Action(ActionKind.FETCH, path, remote, reason="new remote file")
    resolution = resolve(local, remote)
    record = resolution.record
    if resolution.conflict_copy is not None:
        return Action(
            ActionKind.CONFLICT, path, record, resolution.conflict_copy, "concurrent edits"
        )
    if record == local:
        return Action(ActionKind.KEEP, path, local, reason="local version is newer")
    if record.deleted:
        if local.deleted:
            return Action(ActionKind.KEEP, path, record, reason="both deleted")
        return Action(ActionKind.DELETE, path, record, reason="remote delete")
    if (
        not local.deleted
        and local.root == record.root
        and local.executable == record.executable
        and local.mtime_ns == record.mtime_ns
    ):
        return Action(ActionKind.KEEP, path, record, reason="same content; vectors merged")
    return Action(ActionKind.FETCH, path, record, reason="remote version wins")


def _path_of(local: FileVersion | None, remote: FileVersion | None) -> str:
    if local is not None and remote is not None and local.path != remote.path:
        raise LocalProtocolError(f"planning different paths {local.path!r}, {remote.path!r}")
    if local is not None:
        return local.path
    if remote is not None:
        return remote.path
    raise LocalProtocolError("nothing to plan: neither side has a version")
