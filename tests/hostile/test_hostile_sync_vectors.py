"""Hostile version vectors (issue 12, item 5), against the real sync core.

A member could sign a record whose vector holds this device's counter at 2^63-1 (so the
next local edit could not be counted) or 1,024 devices (so the next local edit would have
1,025, which every member refuses). Bounds checked: such counters are refused at the wire;
every vector made here has at most MAX_RECORD_DEVICES entries and still decodes at any
member; compaction never lets an older version look AFTER or EQUAL to a new one; one path
whose vector cannot be bumped does not stop the others' changes from being recorded.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import ContentHash
from p2pfs.sync.local import DiskFile, local_changes
from p2pfs.sync.planner import resolve
from p2pfs.sync.versions import (
    MAX_COUNTER,
    MAX_DEVICES,
    MAX_RECORD_DEVICES,
    MAX_WIRE_COUNTER,
    FileVersion,
    Ordering,
    VersionVector,
)

ME = bytes([0xEE]) * 32
ROOT = ContentHash(bytes(range(32)))


def _device(i: int) -> bytes:
    return i.to_bytes(32, "big")


def _wide(count: int, start: int = 1, counter: int = 7) -> VersionVector:
    return VersionVector.of({_device(start + i): counter + i % 5 for i in range(count)})


def test_counters_near_the_maximum_are_refused_at_the_wire() -> None:
    for counter in (MAX_COUNTER, MAX_WIRE_COUNTER + 1):
        with pytest.raises(RemoteProtocolError, match="bad counter"):
            VersionVector.from_wire_untrusted([[ME, counter]])
    near = VersionVector.from_wire_untrusted([[ME, MAX_WIRE_COUNTER]])
    assert near.bump(ME).counter(ME) == MAX_WIRE_COUNTER + 1


def test_a_full_vector_still_makes_a_record_every_member_accepts() -> None:
    hostile = VersionVector.from_wire_untrusted(_wide(MAX_DEVICES).to_wire())
    mine = hostile.bump(ME)
    assert len(mine) == MAX_RECORD_DEVICES and mine.counter(ME) == 1
    version = FileVersion("a.txt", mine, False, ROOT, 3, False, 1, ME)
    assert FileVersion.decode_untrusted(version.encode()) == version
    assert hostile.compare(mine) is Ordering.CONCURRENT  # never BEFORE: no overwrite


def test_merging_two_full_vectors_is_compacted_and_symmetric() -> None:
    other = bytes([0xDD]) * 32
    a = FileVersion("p", _wide(MAX_DEVICES, 1).bump(ME), False, ROOT, 1, False, 5, ME)
    b_vector = VersionVector.of({**dict(_wide(MAX_DEVICES, 5000).entries), other: 3})
    b = FileVersion("p", b_vector, False, ContentHash(bytes(32)), 1, False, 9, other)
    one, two = resolve(a, b), resolve(b, a)
    assert one == two
    assert len(one.record.version) <= MAX_RECORD_DEVICES
    assert FileVersion.decode_untrusted(one.record.encode()) == one.record


vectors = st.dictionaries(
    st.integers(0, 2000).map(_device), st.integers(1, 50), max_size=MAX_DEVICES
).map(VersionVector.of)


@settings(max_examples=60, deadline=None)
@given(vectors, vectors, st.integers(0, 2000).map(_device))
def test_compaction_never_makes_an_unseen_version_after_or_equal(
    seen: VersionVector, other: VersionVector, device: bytes
) -> None:
    new = seen.bump(device)
    assert len(new) <= MAX_RECORD_DEVICES and new.counter(device) == seen.counter(device) + 1
    # Any version that has not seen this edit (its counter for ``device`` is below it):
    unseen = VersionVector.of(
        {**dict(other.entries), device: min(other.counter(device), seen.counter(device))}
    )
    assert unseen.compare(new) in (Ordering.BEFORE, Ordering.CONCURRENT)
    assert new.compact({device}) == new  # idempotent: every member gets the same vector


def test_one_unbumpable_record_does_not_stop_the_others() -> None:
    stuck = VersionVector.of({ME: MAX_COUNTER})  # stored before the wire bound existed
    fine = VersionVector.of({ME: 1})
    records = {
        "stuck.txt": FileVersion("stuck.txt", stuck, False, ROOT, 1, False, 1, ME),
        "gone.txt": FileVersion("gone.txt", fine, False, ROOT, 1, False, 1, ME),
        "edited.txt": FileVersion("edited.txt", fine, False, ROOT, 1, False, 1, ME),
    }
    new_root = ContentHash(bytes(31) + b"\x01")
    disk = {
        "stuck.txt": DiskFile("stuck.txt", new_root, 2, False, 2),
        "edited.txt": DiskFile("edited.txt", new_root, 2, False, 2),
        "new.txt": DiskFile("new.txt", new_root, 2, False, 2),
    }
    refused: dict[str, str] = {}
    changes = local_changes(records, disk, ME, 5, lambda _p: False, refused=refused)
    assert sorted(c.path for c in changes) == ["edited.txt", "gone.txt", "new.txt"]
    assert list(refused) == ["stuck.txt"]
