"""Whether files about to be written fit in what their file systems have free.

A fetch or a folder that writes more than a disk holds used to fill it with temp files and
then fail on "No space left on device", leaving no room for anything else (and a folder
fetched the same bytes again at every reconcile). Both now ask here first. Each file counts
in whole blocks of its file system, less what its temp file (an interrupted attempt's)
already holds; free space is ``f_bavail``, or ``f_bfree`` for root, who may use the
reserved blocks. Directories and metadata are not counted: only what surely does not fit is
refused, so a write can still meet a full disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToWrite:
    size: int
    directory: str
    """Where the file goes (its file system's free space is asked there)."""
    temp_name: str
    """Its temp file's name in ``directory`` (what an earlier attempt wrote counts)."""


def _free(fs: os.statvfs_result) -> int:
    return (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize


def _blocks(size: int, block: int) -> int:
    return -(-size // block) * block


def _held(item: ToWrite) -> int:
    try:
        return os.lstat(os.path.join(item.directory, item.temp_name)).st_blocks * 512
    except OSError:
        return 0


class _FileSystems:
    """Each directory's file system (one statvfs a directory): its id, free bytes, block."""

    def __init__(self) -> None:
        self._of: dict[str, tuple[int, int, int] | None] = {}

    def of(self, directory: str) -> tuple[int, int, int] | None:
        if directory not in self._of:
            try:
                fs = os.statvfs(directory)
            except OSError:
                self._of[directory] = None  # the write will say what is wrong
            else:
                self._of[directory] = (fs.f_fsid, _free(fs), fs.f_frsize or 4096)
        return self._of[directory]


def _short(files: Sequence[ToWrite], systems: _FileSystems) -> bool:
    """Some file system is asked for more than it has free, no temp file counted (the
    usual answer, no, costs one statvfs a directory and no lstat a file)."""
    asked: dict[int, int] = {}
    for item in files:
        found = systems.of(item.directory)
        if found is not None:
            fs_id, free, block = found
            asked[fs_id] = asked.get(fs_id, 0) + _blocks(item.size, block)
            if asked[fs_id] > free:
                return True
    return False


def lacking_room(files: Sequence[ToWrite]) -> dict[int, str]:
    """The files (by position) that do not fit, counted in order: each that fits takes its
    room from what is left, so a big file that cannot fit does not hold up smaller ones
    after it. Position -> why."""
    systems = _FileSystems()
    if not _short(files, systems):
        return {}
    left: dict[int, int] = {}
    lacking: dict[int, str] = {}
    for position, item in enumerate(files):
        found = systems.of(item.directory)
        if found is None:
            continue
        fs_id, free, block = found
        room = left.setdefault(fs_id, free)
        need = max(0, _blocks(item.size, block) - _held(item))
        if need <= room:
            left[fs_id] = room - need
        else:
            lacking[position] = (
                f"needs {need / 1e6:.1f} MB more and its file system has {room / 1e6:.1f} MB free"
            )
    return lacking


def room_short(files: Sequence[ToWrite]) -> tuple[int, int] | None:
    """None if every file fits; else (bytes needed in all, bytes free) on the first file
    system short of room: a fetch is refused whole."""
    systems = _FileSystems()
    if not _short(files, systems):
        return None
    totals: dict[int, list[int]] = {}
    """File system id -> [bytes needed, bytes free]."""
    for item in files:
        found = systems.of(item.directory)
        if found is not None:
            fs_id, free, block = found
            total = totals.setdefault(fs_id, [0, free])
            total[0] += max(0, _blocks(item.size, block) - _held(item))
    for needed, free in totals.values():
        if needed > free:
            return needed, free
    return None
