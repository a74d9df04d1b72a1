"""The short per-file system calls of a temp file's writer, made without giving up the GIL
where the file system is a local one.

Why: every ``os`` call releases the GIL and takes it back. A writer thread beside a busy
event loop then waits, at every call, for the loop's next release (up to the 0.5 ms
switch interval): at ~8 calls a small file the hand-overs, not the calls, were the
writer's cost (issue 13's small-files profile). The calls here act on an open descriptor
(or, for ``lstat``, on a name our open descriptor keeps in the dentry cache) of a local
file system (ext2/3/4, xfs, tmpfs, f2fs): they read or change an inode in memory and never
wait for a disk or a network, so holding the GIL through them (libc through
``ctypes.PyDLL``, ~1 us each) costs the loop less than a hand-over. The calls that may
wait for a disk (create, write, rename, syncfs) still release it. On any other file system
(NFS and FUSE answer an fstat or flock with a round trip; btrfs may wait for a transaction)
or without glibc's ``statx``, the plain ``os`` calls are used.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys
from dataclasses import dataclass

_LOCAL_FILE_SYSTEMS = frozenset(
    {
        0xEF53,  # ext2/3/4
        0x58465342,  # xfs
        0x01021994,  # tmpfs
        0xF2F52010,  # f2fs
    }
)
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BASIC_STATS = 0x7FF
_STATX_SIZE = 256
# struct statx is laid out alike on every architecture (linux/stat.h): nlink, uid, gid,
# mode, padding, ino, size from byte 16; the device's major and minor from byte 136.
_STATX_FIELDS = struct.Struct("=IIIHHQQ")
_STATX_DEVICE = struct.Struct("=II")
_STATFS_SIZE = 256


@dataclass(frozen=True, slots=True)
class FileStat:
    """What a writer needs of an inode."""

    dev: int
    ino: int
    size: int
    mode: int
    uid: int
    nlink: int


def _load_libc() -> tuple[ctypes.PyDLL, ctypes.CDLL] | None:
    """libc twice: through PyDLL (the GIL held during a call) and CDLL (released)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        for name in ("statx", "flock", "fchmod", "futimens", "close"):
            getattr(libc, name)
        releasing = ctypes.CDLL(None, use_errno=True)
        releasing.fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    libc.statx.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_char_p,
    ]
    libc.flock.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.fchmod.argtypes = [ctypes.c_int, ctypes.c_uint]
    libc.futimens.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.close.argtypes = [ctypes.c_int]
    return libc, releasing


_LIBCS = _load_libc()
_LIBC = _LIBCS[0] if _LIBCS is not None else None


def _raise_errno() -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code))


class FileCalls:
    """The plain ``os`` calls (each gives the GIL up)."""

    held = False

    def fstat(self, fd: int) -> FileStat:
        st = os.fstat(fd)
        return FileStat(st.st_dev, st.st_ino, st.st_size, st.st_mode, st.st_uid, st.st_nlink)

    def lstat(self, name: str, dir_fd: int) -> tuple[int, int]:
        """(st_dev, st_ino) of ``name`` in the directory, not following a symlink."""
        st = os.lstat(name, dir_fd=dir_fd)
        return st.st_dev, st.st_ino

    def try_lock(self, fd: int) -> bool:
        """An exclusive flock without waiting; False where another descriptor holds one."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def set_metadata(self, fd: int, mode: int, mtime_ns: int | None) -> None:
        os.fchmod(fd, mode)
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))

    def close(self, fd: int) -> None:
        os.close(fd)


class HeldFileCalls(FileCalls):
    """The same calls through libc with the GIL held: for a local file system only."""

    held = True

    def fstat(self, fd: int) -> FileStat:
        return self._statx(fd, b"", _AT_EMPTY_PATH)

    def lstat(self, name: str, dir_fd: int) -> tuple[int, int]:
        st = self._statx(dir_fd, os.fsencode(name), _AT_SYMLINK_NOFOLLOW)
        return st.dev, st.ino

    @staticmethod
    def _statx(fd: int, path: bytes, flags: int) -> FileStat:
        assert _LIBC is not None
        buffer = ctypes.create_string_buffer(_STATX_SIZE)
        if _LIBC.statx(fd, path, flags, _STATX_BASIC_STATS, buffer) != 0:
            _raise_errno()
        nlink, uid, _gid, mode, _pad, ino, size = _STATX_FIELDS.unpack_from(buffer, 16)
        major, minor = _STATX_DEVICE.unpack_from(buffer, 136)
        return FileStat(os.makedev(major, minor), ino, size, mode, uid, nlink)

    def try_lock(self, fd: int) -> bool:
        assert _LIBC is not None
        if _LIBC.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) == 0:
            return True
        if ctypes.get_errno() == errno.EWOULDBLOCK:
            return False
        _raise_errno()
        return False  # not reached

    def set_metadata(self, fd: int, mode: int, mtime_ns: int | None) -> None:
        assert _LIBC is not None
        if _LIBC.fchmod(fd, mode) != 0:
            _raise_errno()
        if mtime_ns is not None:
            seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
            times = (ctypes.c_long * 4)(seconds, nanoseconds, seconds, nanoseconds)
            if _LIBC.futimens(fd, times) != 0:
                _raise_errno()

    def close(self, fd: int) -> None:
        assert _LIBC is not None
        if _LIBC.close(fd) != 0:
            _raise_errno()


PLAIN_CALLS = FileCalls()
HELD_CALLS = HeldFileCalls()


def calls_for_directory(dir_fd: int) -> FileCalls:
    """The held calls where the directory's file system is a local one, else the plain."""
    if _LIBCS is None:
        return PLAIN_CALLS
    buffer = ctypes.create_string_buffer(_STATFS_SIZE)
    if _LIBCS[1].fstatfs(dir_fd, buffer) != 0:  # may be a round trip: the GIL released
        return PLAIN_CALLS
    # f_type is the first field of struct statfs: a long (__fsword_t) on Linux.
    f_type = ctypes.c_long.from_buffer_copy(buffer.raw[: ctypes.sizeof(ctypes.c_long)]).value
    return HELD_CALLS if f_type in _LOCAL_FILE_SYSTEMS else PLAIN_CALLS
