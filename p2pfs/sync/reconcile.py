"""Reconciling a member's folder with the records a peer sent (sans-I/O).

This is the whole decision of one reconcile, and the daemon's folder engine only performs
it (fetch, place, delete, sign and store). Two kinds of member, as Syncthing splits
send-receive and receive-only folders, take explicit paths:

- :func:`plan_read_write`: a member that can sign. Each path goes through the symmetric
  per-path rule (:func:`p2pfs.sync.planner.plan_file`): merges of concurrent versions and
  conflict copies are made here, identically on every member.
- :func:`plan_read_only`: a member that cannot sign takes a peer's record only if it wins
  over its own (:func:`takes`), and makes no merge and no copy; the read-write members'
  merges reach it later. Its own unrecorded edits are never touched.

Both take the winner as it is for a path whose content this member does not hold (ignored
here, or stored *absent*): the members holding both sides' content make the merges there.
On a file system that ignores case, a placement equal but for case to a file that is here
(a synced one, one not recorded yet, or an ignored one) is held back (not placed, its record
waits) and reported as a collision; once that file is gone the next plan places it.
Records held absent whose path is no longer ignored have their content fetched.

A record "waits" for a destination (:attr:`Plan.waits_for`): the engine stores it only once
that destination is placed, so a record never claims content the member does not hold.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from p2pfs.sync.local import case_collisions
from p2pfs.sync.planner import ActionKind, concurrent_winner, plan_file
from p2pfs.sync.versions import FileVersion, Ordering


def _nothing_ignored(_path: str) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class Holdings:
    """What this member holds, as far as a plan needs to know."""

    records: Mapping[str, FileVersion]
    absent: Collection[str] = frozenset()
    """Paths whose record is stored without its content (it was ignored here)."""
    ignored: Callable[[str], bool] = _nothing_ignored
    on_disk: Collection[str] = frozenset()
    """Paths holding a regular file as of the last scan."""
    ignored_on_disk: Collection[str] = frozenset()
    """Paths of files and directories the last scan left out as ignored here (only their
    names matter: on a file system that ignores case, they hold names a placement must not
    land on)."""
    case_insensitive: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    """What one reconcile does. Records are listed in the order they are to be stored (a
    later one for a path replaces an earlier one)."""

    records: tuple[FileVersion, ...] = ()
    fetch: tuple[tuple[str, FileVersion], ...] = ()
    """(destination path, the version whose content goes there)."""
    delete: tuple[str, ...] = ()
    conflict_moves: Mapping[str, str] = field(default_factory=dict)
    """Local losers of a conflict: path -> conflict copy path (linked before replacement)."""
    waits_for: Mapping[str, str] = field(default_factory=dict)
    """Record path -> the destination that must be placed before the record is stored."""
    absent: frozenset[str] = frozenset()
    """Paths whose records are stored without their content (ignored here)."""
    collisions: Mapping[str, str] = field(default_factory=dict)
    """Paths not placed because they collide with another on this file system."""
    conflicts: Mapping[str, str] = field(default_factory=dict)
    """Paths where a conflict copy is made: path -> copy path."""


@dataclass(slots=True)
class _Draft:
    records: list[FileVersion] = field(default_factory=list)
    fetch: list[tuple[str, FileVersion]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    conflict_moves: dict[str, str] = field(default_factory=dict)
    waits_for: dict[str, str] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)
    conflicts: dict[str, str] = field(default_factory=dict)

    def place(self, path: str, version: FileVersion) -> None:
        """Fetch ``version``'s content to ``path``; the record there waits for it."""
        self.fetch.append((path, version))
        self.waits_for[path] = path


def plan_read_write(held: Holdings, remote: Iterable[FileVersion]) -> Plan:
    """The plan of a member that signs records, for ``remote`` (a peer's records that
    differ from ours, one per path)."""
    draft = _Draft()
    for theirs in remote:
        path = theirs.path
        mine = held.records.get(path)
        if held.ignored(path) or path in held.absent:
            # Content we do not hold: take the winning record as it is (no merge signed, no
            # conflict copy made: the member holding the other side's content makes those).
            _take_winner(draft, held, mine, theirs)
        else:
            _plan_path(draft, held, mine, theirs)
    return _finish(draft, held)


def plan_read_only(
    held: Holdings, remote: Iterable[FileVersion], unrecorded: Collection[str] = ()
) -> Plan:
    """The plan of a member that cannot sign: it takes the records that win (the same rule
    everywhere, so read-only members agree), and read-write members' merges reach it later.

    ``unrecorded``: paths where this member's own edit sits on disk, unrecordable. The
    record is still taken (the index converges with the others'); the disk is left alone.
    """
    draft = _Draft()
    for theirs in remote:
        mine = held.records.get(theirs.path)
        _take_winner(draft, held, mine, theirs, touch_disk=theirs.path not in unrecorded)
    return _finish(draft, held)


def takes(mine: FileVersion | None, theirs: FileVersion) -> bool:
    """Whether a member that does not merge stores ``theirs`` over ``mine``: AFTER, or
    CONCURRENT (or EQUAL vectors, different records) and the winner by the rule every
    member applies (a live file over a tombstone, else the newer)."""
    if mine is None:
        return True
    order = theirs.version.compare(mine.version)
    if order is Ordering.AFTER:
        return True
    if order is Ordering.BEFORE or theirs == mine:
        return False
    return concurrent_winner(mine, theirs) is theirs


def missing_content(absent: Iterable[str], ignored: Callable[[str], bool]) -> bool:
    """Whether any record held without content has a path no longer ignored."""
    return any(not ignored(path) for path in absent)


def _plan_path(
    draft: _Draft, held: Holdings, mine: FileVersion | None, theirs: FileVersion
) -> None:
    path = theirs.path
    action = plan_file(mine, theirs)
    record = action.record
    if record is None or record == mine:
        return
    draft.records.append(record)
    if action.kind is ActionKind.FETCH:
        draft.place(path, record)
    elif action.kind is ActionKind.DELETE:
        draft.delete.append(path)
    elif action.kind is ActionKind.CONFLICT:
        copy = action.conflict_copy
        assert copy is not None and mine is not None
        ours_lost = not mine.deleted and mine.root == copy.root and record.root != copy.root
        if ours_lost:
            draft.place(path, record)
        if copy.is_directory or not _copy_is_new(draft, held, copy):
            # A directory needs no copy (its content is its files' records); a copy that
            # exists already (maybe edited since) is kept.
            return
        draft.records.append(copy)
        draft.conflicts[path] = copy.path
        if ours_lost:
            draft.conflict_moves[path] = copy.path  # ours stays, as the copy
            draft.waits_for[copy.path] = path
        else:
            draft.place(copy.path, copy)
            # The merged record is AFTER the loser's: once stored, the conflict is never
            # planned again here, and every member takes the merged record over the loser.
            # So it waits for the copy, or the loser's edit would vanish whenever its content
            # cannot be fetched now (its member offline, or its file changed since).
            draft.waits_for[path] = copy.path


def _copy_is_new(draft: _Draft, held: Holdings, copy: FileVersion) -> bool:
    if copy.path in draft.waits_for or any(r.path == copy.path for r in draft.records):
        return False
    existing = held.records.get(copy.path)
    if existing is None:
        return True
    return existing.version.compare(copy.version) not in (Ordering.AFTER, Ordering.EQUAL)


def _take_winner(
    draft: _Draft,
    held: Holdings,
    mine: FileVersion | None,
    theirs: FileVersion,
    *,
    touch_disk: bool = True,
) -> None:
    """Store ``theirs`` if it wins over ours, and make the disk match it."""
    if not takes(mine, theirs):
        return
    draft.records.append(theirs)
    path = theirs.path
    if not touch_disk:
        return
    if held.ignored(path):
        draft.absent.add(path)
        return
    holds_content = mine is not None and not mine.deleted and path not in held.absent
    if theirs.deleted:
        if holds_content:
            draft.delete.append(path)
    elif (
        not holds_content
        or mine is None
        or mine.root != theirs.root
        or mine.executable != theirs.executable
    ):
        draft.place(path, theirs)


def _finish(draft: _Draft, held: Holdings) -> Plan:
    _fetch_missing_content(draft, held)
    # Last, so every placement is checked, content fetched for a no-longer-ignored record
    # included (hypothesis found one landing on a live path that differs only by case).
    collisions = _hold_case_collisions(draft, held) if held.case_insensitive else {}
    return Plan(
        records=tuple(draft.records),
        fetch=tuple(draft.fetch),
        delete=tuple(draft.delete),
        conflict_moves=draft.conflict_moves,
        waits_for=draft.waits_for,
        absent=frozenset(draft.absent),
        collisions=collisions,
        conflicts=draft.conflicts,
    )


def _hold_case_collisions(draft: _Draft, held: Holdings) -> dict[str, str]:
    """A placement equal but for case to a path whose file is here would land on it: it is
    not placed (so its record, which waits for the placement, is not stored either).
    Every placement is checked, a path already recorded too (two records may differ only
    by case when one of them is held absent); an absent record has no file to land on.
    Files that are not synced count too (found by the scan but not recorded: a read-only
    member's own edit; or ignored here): a placement would otherwise wait on them unseen,
    the destination never being as scanned. For an ignored path the scan, not the record,
    says whether a file is here (its absence is never recorded)."""
    here = {
        path
        for path, version in held.records.items()
        if not version.deleted and path not in held.absent and not held.ignored(path)
    }
    here.update(held.on_disk)
    here.update(held.ignored_on_disk)
    collisions = case_collisions(here, [path for path, _version in draft.fetch])
    draft.fetch = [(path, v) for path, v in draft.fetch if path not in collisions]
    return collisions


def _fetch_missing_content(draft: _Draft, held: Holdings) -> None:
    """Records held without content whose path is no longer ignored: fetch the content now
    (from this member, if it has it; else from another, later)."""
    planned = {path for path, _version in draft.fetch} | set(draft.waits_for)
    for path in sorted(held.absent):
        record = held.records.get(path)
        if record is None or path in planned or held.ignored(path):
            continue
        if path in held.on_disk:
            continue  # a local file there: the scan makes it a concurrent version
        draft.place(path, record)
        draft.records.append(record)
