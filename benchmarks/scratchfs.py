"""A fresh file system for one benchmark run (``--fresh-fs``).

Small-file figures on this machine depend on what ran on the disk just before: its root
ext4 has no journal, and there a create passes over every inode of its group freed in the
last 60-360 s (``benchmarks/filesystem.py``). A bench run that follows another one (which
removed its 100,000 files at exit) paid 3-4 CPU-s more in the receiver for a 50k-file join.
A new ext4 made for the run, with the root's features (no journal), in an image file
loop-mounted beside the scratch directory, has no such history: runs compare with each
other. Needs root (mount); the image is removed when the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

GiB = 1 << 30
FRESH_FS_BYTES = 16 * GiB
"""A sparse image: only what a run writes takes disk space; ~1M inodes at mkfs's default
ratio, room for the 200k-file runs of both members."""


class ScratchFsError(RuntimeError):
    """The fresh file system could not be made or mounted (not root, no loop device)."""


def _run(*command: str) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ScratchFsError(f"{command[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise ScratchFsError(f"{' '.join(command)}: {exc.stderr.strip() or exc}") from exc


@contextlib.contextmanager
def fresh_ext4(size: int, under: Path | None = None, journal: bool = False) -> Iterator[Path]:
    """A new, empty ext4 of ``size`` bytes (sparse image in ``under``, default $TMPDIR)
    mounted through a loop device for the block's duration; yields its mount point."""
    if os.geteuid() != 0:
        raise ScratchFsError("a fresh file system needs root (mount)")
    if under is not None:
        Path(under).mkdir(parents=True, exist_ok=True)  # a --workdir not made yet
    place = Path(tempfile.mkdtemp(prefix="p2pfs-bench-fs-", dir=under))
    image, mount_point = place / "fs.img", place / "mnt"
    mount_point.mkdir()
    mounted = False
    try:
        with image.open("wb") as handle:
            handle.truncate(size)
        features = [] if journal else ["-O", "^has_journal"]
        _run("mkfs.ext4", "-q", "-F", *features, str(image))
        _run("mount", "-o", "loop", str(image), str(mount_point))
        mounted = True
        yield mount_point
    finally:
        if mounted:
            _run("umount", str(mount_point))
        image.unlink(missing_ok=True)
        mount_point.rmdir()
        place.rmdir()


def run_on_fresh_fs_if_asked(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], int]
) -> int:
    """``run(args)``; with ``args.fresh_fs``, on a new ext4 under ``args.workdir`` that
    becomes the run's workdir (a bench's ``--fresh-fs``). Exit status 2 if none can be made."""
    if not args.fresh_fs:
        return run(args)
    try:
        with fresh_ext4(FRESH_FS_BYTES, args.workdir) as mount_point:
            args.workdir = str(mount_point)
            return run(args)
    except ScratchFsError as exc:
        print(f"--fresh-fs: {exc}", file=sys.stderr)
        return 2
