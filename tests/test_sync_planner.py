"""The per-path rules (sync/planner.py); sync/reconcile.py applies them to a whole
reconcile, and tests/test_sync_reconcile.py runs members against it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.content.names import MAX_NAME_BYTES, validate_relative_path
from p2pfs.errors import LocalProtocolError
from p2pfs.ids import ContentHash
from p2pfs.sync.planner import (
    ActionKind,
    conflict_name,
    conflict_original,
    plan_file,
    resolve,
)
from p2pfs.sync.versions import FileVersion, Ordering, VersionVector, short_device

A, B, C = (bytes([i]) * 32 for i in (1, 2, 3))
R1, R2, R3 = (ContentHash(bytes([i]) * 32) for i in (11, 12, 13))
SECOND = 1_000_000_000
T0 = 1_767_225_600 * SECOND  # 2026-01-01T00:00:00Z


def edit(
    previous: FileVersion | None, path: str, device: bytes, root: ContentHash, mtime: int
) -> FileVersion:
    base = previous.version if previous is not None else VersionVector.empty()
    return FileVersion(path, base.bump(device), False, root, 10, False, mtime, device)


def delete(previous: FileVersion, device: bytes, mtime: int) -> FileVersion:
    return FileVersion.tombstone(previous.path, previous.version.bump(device), mtime, device)


# --- examples ---------------------------------------------------------------------------


def test_conflict_name_format() -> None:
    when = T0 + (13 * 3600 + 5 * 60 + 9) * SECOND + 999_999_999
    dev = short_device(A)
    assert conflict_name("docs/report.txt", when, A) == (
        f"docs/report.sync-conflict-20260101-130509-{dev}.txt"
    )
    assert conflict_name("Makefile", T0, A) == f"Makefile.sync-conflict-20260101-000000-{dev}"
    assert conflict_name(".bashrc", T0, A) == f".bashrc.sync-conflict-20260101-000000-{dev}"
    assert conflict_name("a.tar.gz", T0, A) == f"a.tar.sync-conflict-20260101-000000-{dev}.gz"
    assert conflict_name("old", -SECOND, A) == f"old.sync-conflict-19691231-235959-{dev}"


@given(st.text(min_size=1, max_size=300), st.integers(-(1 << 63), (1 << 63) - 1))
def test_conflict_names_are_always_valid(name: str, mtime: int) -> None:
    try:
        path = validate_relative_path("d/" + name[:200])
    except LocalProtocolError:
        return
    copy = conflict_name(path, mtime, B)
    assert validate_relative_path(copy) == copy
    assert len(copy.rpartition("/")[2].encode()) <= MAX_NAME_BYTES
    assert copy.startswith("d/") and short_device(B) in copy


def test_new_remote_file_is_fetched_and_unknown_tombstone_recorded() -> None:
    remote = edit(None, "f", B, R1, T0)
    assert plan_file(None, remote).kind is ActionKind.FETCH
    gone = delete(remote, B, T0 + SECOND)
    action = plan_file(None, gone)
    assert (action.kind, action.record) == (ActionKind.KEEP, gone)


def test_remote_delete_of_what_we_hold_deletes() -> None:
    base = edit(None, "f", A, R1, T0)
    action = plan_file(base, delete(base, B, T0 + SECOND))
    assert action.kind is ActionKind.DELETE


def test_delete_never_beats_concurrent_edit() -> None:
    base = edit(None, "f", A, R1, T0)
    edited = edit(base, "f", A, R2, T0 + 5 * SECOND)
    gone = delete(base, B, T0 + 9 * SECOND)  # later in time, but it never saw the edit
    mine = plan_file(edited, gone)
    theirs = plan_file(gone, edited)
    assert mine.kind is ActionKind.KEEP
    assert theirs.kind is ActionKind.FETCH
    assert mine.record == theirs.record
    assert mine.record is not None and mine.record.root == R2
    assert mine.record.version.compare(gone.version) is Ordering.AFTER


def test_newer_local_version_is_kept() -> None:
    base = edit(None, "f", A, R1, T0)
    newer = edit(base, "f", A, R2, T0 + SECOND)
    action = plan_file(newer, base)
    assert (action.kind, action.record, action.conflict_copy) == (ActionKind.KEEP, newer, None)
    assert plan_file(newer, delete(base, B, T0)).kind is ActionKind.KEEP


def test_unrecorded_local_change_is_never_overwritten() -> None:
    base = edit(None, "f", A, R1, T0)
    for remote in (edit(base, "f", B, R2, T0 + SECOND), delete(base, B, T0 + SECOND)):
        action = plan_file(base, remote, local_changed=True)
        assert (action.kind, action.record) == (ActionKind.KEEP, base)
    # An untracked file where the remote has one: kept until the scanner records it.
    assert plan_file(None, base, local_changed=True).kind is ActionKind.KEEP


def test_concurrent_edits_conflict_and_newer_mtime_wins() -> None:
    base = edit(None, "n.txt", A, R1, T0)
    ours = edit(base, "n.txt", A, R2, T0 + 10 * SECOND)
    theirs = edit(base, "n.txt", B, R3, T0 + 20 * SECOND)
    mine = plan_file(ours, theirs)
    other = plan_file(theirs, ours)
    assert mine.kind is other.kind is ActionKind.CONFLICT
    assert mine.record == other.record and mine.conflict_copy == other.conflict_copy
    assert mine.record is not None and mine.record.root == R3
    copy = mine.conflict_copy
    assert copy is not None and copy.root == R2
    assert copy.path == f"n.sync-conflict-20260101-000010-{short_device(A)}.txt"


def test_mtime_tie_is_broken_by_device() -> None:
    base = edit(None, "f", A, R1, T0)
    ours = edit(base, "f", A, R2, T0 + SECOND)
    theirs = edit(base, "f", B, R3, T0 + SECOND)
    result = resolve(ours, theirs)
    assert result.record.root == R3  # B > A
    assert result.conflict_copy is not None and result.conflict_copy.root == R2


def test_concurrent_identical_content_is_not_a_conflict() -> None:
    base = edit(None, "f", A, R1, T0)
    ours = edit(base, "f", A, R2, T0 + SECOND)
    theirs = edit(base, "f", B, R2, T0 + 2 * SECOND)
    assert resolve(ours, theirs).conflict_copy is None
    assert plan_file(ours, theirs).kind is ActionKind.FETCH  # adopt the winner's mtime


def test_conflict_original_undoes_conflict_name() -> None:
    for path in ("docs/report.txt", "Makefile", "a.tar.gz", ".bashrc"):
        assert conflict_original(conflict_name(path, T0, A)) == path
    assert conflict_original("plain.txt") == "plain.txt"
