"""What file system a benchmark writes to, for its footer.

Small-file figures depend on it: this machine's root file system is ext4 without a journal,
and there the kernel's inode allocator (``find_inode_bit`` in ``fs/ext4/ialloc.c``, which
checks for recent deletions only when there is no journal) passes over every free inode of
the group deleted in the last 60 s, or 360 s while its inode-table block is dirty, reading
each one's block. Measured here, 2,000 creates of 1 KiB files took 0.14-1.25 s on the root
file system and 0.04 s on a journaled ext4 (a loop device on the same disk).
"""

from __future__ import annotations

import os
from pathlib import Path


def _mount_of(path: Path) -> tuple[str, str] | None:
    """(file system type, source) of the mount holding ``path``, from mountinfo."""
    target = os.path.realpath(path)
    best: tuple[int, str, str] | None = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        mount_point = fields[0].split()[4].replace("\\040", " ")
        fs_type, source = [*fields[1].split(), "", ""][:2]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) > best[0]):
            best = (len(mount_point), fs_type, source)
    return (best[1], best[2]) if best else None


def _has_journal(path: Path) -> bool | None:
    """Whether the ext4 file system holding ``path`` has a journal (jbd2 lists each
    journaled device as ``NAME-INO``); None when the device's name is not known."""
    device = os.stat(path).st_dev
    link = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    try:
        name = link.resolve().name
    except OSError:
        return None
    try:
        journals = os.listdir("/proc/fs/jbd2")
    except OSError:
        journals = []
    return any(entry.rsplit("-", 1)[0] == name for entry in journals)


def describe(path: Path) -> str:
    """e.g. ``ext4 on /dev/vda, no journal``: for a benchmark's footer."""
    mount = _mount_of(path)
    if mount is None:
        return "file system unknown"
    fs_type, source = mount
    text = f"{fs_type} on {source}"
    if fs_type == "ext4":
        journal = _has_journal(path)
        if journal is not None:
            text += ", journaled" if journal else ", no journal"
    return text
