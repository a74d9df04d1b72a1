"""benchmarks/scratchfs.py: a fresh ext4 per bench run, loop-mounted, gone afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.filesystem import describe
from benchmarks.scratchfs import ScratchFsError, fresh_ext4

MiB = 1 << 20


def test_fresh_ext4_is_mounted_empty_and_removed(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        with pytest.raises(ScratchFsError), fresh_ext4(64 * MiB, tmp_path):
            pass
        return
    try:
        # Under a directory not made yet (a bench's --workdir): made first.
        with fresh_ext4(64 * MiB, tmp_path / "new" / "workdir") as mount_point:
            assert os.path.ismount(mount_point)
            assert describe(mount_point).startswith("ext4 on /dev/loop")
            assert describe(mount_point).endswith("no journal")
            assert sorted(os.listdir(mount_point)) == ["lost+found"]
            (mount_point / "file").write_bytes(b"x" * 4096)
    except ScratchFsError as exc:  # a machine without loop devices
        pytest.skip(str(exc))
    assert not os.path.ismount(mount_point)
    assert list((tmp_path / "new" / "workdir").iterdir()) == []  # image and mount point gone
