"""A folder's need (daemon/folders/need.py): what a member reports as its completion."""

from __future__ import annotations

from p2pfs.daemon.folders.need import NeedTracker
from p2pfs.ids import ContentHash
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.planner import conflict_device, conflict_name
from p2pfs.sync.records import SignedRecord
from p2pfs.sync.recordset import RecordSet
from p2pfs.sync.versions import FileVersion, VersionVector, short_device
from p2pfs.wire.messages import FolderNeed

KEYS = FolderKeys.from_write_seed(bytes(range(32)))
DEVICE = bytes([7]) * 32


def put(records: RecordSet, path: str, size: int, *, deleted: bool = False) -> None:
    vector = VersionVector.of({DEVICE: 1})
    if deleted:
        version = FileVersion.tombstone(path, vector, 1, DEVICE)
    else:
        root = ContentHash(bytes([size % 251 + 1]) * 32)
        version = FileVersion(path, vector, False, root, size, False, 1, DEVICE)
    record = SignedRecord.sign(version, KEYS)
    records.put(path, record.encode(), record)


def test_need_counts_down_as_a_plan_is_placed() -> None:
    records = RecordSet()
    put(records, "kept.txt", 1000)
    put(records, "edited.txt", 200)
    put(records, "gone.txt", 0, deleted=True)
    tracker = NeedTracker()
    nothing = tracker.need(records, (), lambda _path: False)
    assert nothing == FolderNeed(0, 0, 2, 1200) and nothing.percent == 100.0
    # A plan: one new file (500 bytes) and a new version of edited.txt (300 bytes).
    tracker.plan({"new.bin": 500, "edited.txt": 300}, records)
    assert tracker.need(records, (), lambda _path: False) == FolderNeed(2, 800, 3, 1800)
    tracker.received += 300  # chunks arrive before any file is placed
    need = tracker.need(records, (), lambda _path: False)
    assert need == FolderNeed(2, 500, 3, 1800) and 0 < need.percent < 100
    tracker.placed_files, tracker.placed_bytes = 1, 500  # a step placed new.bin
    assert tracker.need(records, (), lambda _path: False) == FolderNeed(1, 300, 3, 1800)
    # The records are stored and edited.txt failed: what is left is planned again.
    put(records, "new.bin", 500)
    tracker.plan({"edited.txt": 300}, records)
    left = tracker.need(records, (), lambda _path: False)
    assert left == FolderNeed(1, 300, 3, 1800) and left.percent == round(100 * 1500 / 1800, 1)
    put(records, "edited.txt", 300)
    tracker.plan({}, records)
    assert tracker.need(records, (), lambda _path: False) == FolderNeed(0, 0, 3, 1800)


def test_records_held_without_content_are_needed_unless_ignored() -> None:
    records = RecordSet()
    put(records, "big.iso", 4000)
    put(records, "doc.txt", 1000)
    tracker = NeedTracker()
    ignored = {"big.iso"}
    assert tracker.need(records, ["big.iso"], ignored.__contains__) == FolderNeed(0, 0, 2, 5000)
    ignored.clear()  # no longer ignored here: the next reconcile fetches it
    assert tracker.need(records, ["big.iso"], ignored.__contains__) == FolderNeed(1, 4000, 2, 5000)


def test_a_conflict_copy_names_its_device_tag() -> None:
    copy = conflict_name("notes/a.txt", 1_700_000_000 * 10**9, DEVICE)
    assert conflict_device(copy) == short_device(DEVICE)
    assert conflict_device("notes/a.txt") is None
    assert conflict_device("a.sync-conflict-garbage.txt") is None


def test_records_not_planned_yet_count_as_needed_until_their_batch_is_planned() -> None:
    """A join plans a member's records in batches: the ones not planned yet are needed
    (bytes estimated), so the completion never reads 100% (or 99.9%) after the first batch."""
    records = RecordSet()
    tracker = NeedTracker()
    # The first of three batches planned: 2 files of 100 bytes; 4 records to go (~100 each).
    tracker.plan({"a": 100, "b": 100}, records, unplanned=4, unplanned_bytes=400)
    first = tracker.need(records, (), lambda _path: False)
    assert first == FolderNeed(6, 600, 6, 600) and first.percent == 0.0
    tracker.placed_files, tracker.placed_bytes = 2, 200  # placed; stored at the batch's end
    placed = tracker.need(records, (), lambda _path: False)
    assert placed == FolderNeed(4, 400, 6, 600) and placed.percent == round(100 * 200 / 600, 1)
    put(records, "a", 100)
    put(records, "b", 100)
    # The last batch planned: nothing is estimated any more.
    tracker.plan({"c": 50}, records)
    assert tracker.need(records, (), lambda _path: False) == FolderNeed(1, 50, 3, 250)
