"""The benchmarks' footer names the file system their trees are written to."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.filesystem import describe


def _mount_types() -> set[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return {line.split(" - ", 1)[1].split()[0] for line in lines if " - " in line}


def test_a_directory_is_described_by_its_own_mount(tmp_path: Path) -> None:
    text = describe(tmp_path)
    fs_type = text.split(" on ", 1)[0]
    assert fs_type in _mount_types()
    assert describe(Path("/proc")) == "proc on proc"  # the deepest mount wins, not /


def test_ext4_says_whether_it_has_a_journal(tmp_path: Path) -> None:
    text = describe(tmp_path)
    if not text.startswith("ext4 "):
        return  # only ext4 carries the journal note
    journaled = os.path.isdir("/proc/fs/jbd2") and bool(os.listdir("/proc/fs/jbd2"))
    assert text.endswith((", journaled", ", no journal"))
    if not journaled:
        assert text.endswith(", no journal")
