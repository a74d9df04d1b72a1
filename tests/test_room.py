"""store/room.py on a real 16 MiB ext4 (made by the test; skipped without root)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.scratchfs import ScratchFsError, fresh_ext4
from p2pfs.store.room import ToWrite, lacking_room, room_short

MiB = 1 << 20


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    try:
        with fresh_ext4(16 * MiB, under=tmp_path) as mount_point:
            yield mount_point
    except ScratchFsError as exc:
        pytest.skip(str(exc))


def test_files_that_fit_go_ahead_of_one_that_does_not(small: Path) -> None:
    files = [
        ToWrite(24 * MiB, str(small), ".part-a"),  # more than the whole file system
        ToWrite(1000, str(small), ".part-b"),
        ToWrite(10 * MiB, str(small), ".part-c"),
        ToWrite(10 * MiB, str(small), ".part-d"),  # the first 10 MiB took its room
    ]
    lacking = lacking_room(files)
    assert sorted(lacking) == [0, 3]
    assert lacking[0].startswith("needs 25.2 MB more")
    assert room_short(files) is not None
    assert lacking_room(files[1:3]) == {}
    assert room_short(files[1:3]) is None


def test_what_a_temp_file_already_holds_counts(small: Path) -> None:
    with (small / ".part-big").open("wb") as temp:
        temp.write(os.urandom(8 * MiB))  # an interrupted attempt's 8 MiB, on the disk
    big = ToWrite(12 * MiB, str(small), ".part-big")
    # ~7 MB are free now: the 12 MiB file needs only its 4 MiB still missing.
    assert lacking_room([big]) == {}
    assert room_short([big]) is None
    elsewhere = ToWrite(12 * MiB, str(small), ".part-other")
    assert list(lacking_room([elsewhere])) == [0]
    short = room_short([elsewhere])
    assert short is not None and short[0] == 12 * MiB and short[1] < 8 * MiB
