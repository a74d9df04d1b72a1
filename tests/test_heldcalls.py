"""The GIL-holding per-file calls answer exactly as the plain os calls do."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from pathlib import Path

import pytest

from p2pfs.store.heldcalls import HELD_CALLS, PLAIN_CALLS, FileCalls, calls_for_directory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux libc calls")

CALLS = [pytest.param(PLAIN_CALLS, id="plain"), pytest.param(HELD_CALLS, id="held")]


def _directory_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_a_local_directory_gets_the_held_calls_and_proc_the_plain(tmp_path: Path) -> None:
    fd = _directory_fd(tmp_path)
    try:
        assert calls_for_directory(fd) is HELD_CALLS  # pytest's scratch: a local disk or tmpfs
    finally:
        os.close(fd)
    fd = _directory_fd(Path("/proc"))
    try:
        assert calls_for_directory(fd) is PLAIN_CALLS
    finally:
        os.close(fd)


@pytest.mark.parametrize("calls", CALLS)
def test_fstat_and_lstat_agree_with_os(tmp_path: Path, calls: FileCalls) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 12345)
    (tmp_path / "link").symlink_to(path)
    fd = os.open(path, os.O_RDONLY)
    directory = _directory_fd(tmp_path)
    try:
        got = calls.fstat(fd)
        want = os.fstat(fd)
        assert (got.dev, got.ino, got.size, got.mode, got.uid, got.nlink) == (
            want.st_dev,
            want.st_ino,
            12345,
            want.st_mode,
            want.st_uid,
            1,
        )
        link = os.lstat(tmp_path / "link")
        assert calls.lstat("link", directory) == (link.st_dev, link.st_ino)  # not followed
        assert link.st_ino != want.st_ino
        with pytest.raises(FileNotFoundError):
            calls.lstat("absent", directory)
    finally:
        os.close(fd)
        os.close(directory)
    with pytest.raises(OSError) as caught:
        calls.fstat(fd)  # closed
    assert caught.value.errno == errno.EBADF


@pytest.mark.parametrize("calls", CALLS)
def test_lock_metadata_and_close(tmp_path: Path, calls: FileCalls) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    holder = os.open(path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    fd = os.open(path, os.O_RDWR)
    try:
        assert not calls.try_lock(fd)  # another open file holds it
        os.close(holder)
        assert calls.try_lock(fd)
        calls.set_metadata(fd, 0o640, 1_600_000_000_123_456_789)
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o640
        assert info.st_mtime_ns == 1_600_000_000_123_456_789
        calls.set_metadata(fd, 0o600, None)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        calls.close(fd)
    with pytest.raises(OSError):
        calls.close(fd)
    again = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the close released the lock
    finally:
        os.close(again)
