"""Descriptors of destination directories: opened without following a symlink, and shared
by the temp files of a batch (one open and one check per directory, not per file)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from p2pfs.errors import StorageError

_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

DirectoryIdentity = tuple[int, int]
"""(st_dev, st_ino) of a directory."""


def open_directory(path: str) -> tuple[int, DirectoryIdentity]:
    """A descriptor of the directory at ``path`` (a symlink as its last component is refused,
    never followed) and its identity."""
    try:
        fd = os.open(path or ".", _OPEN_DIRECTORY)
    except OSError as exc:
        raise StorageError(f"cannot open directory {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise StorageError(f"cannot open directory {path}: {exc.strerror or exc}") from exc
    return fd, (st.st_dev, st.st_ino)


@dataclass(slots=True)
class _Shared:
    fd: int
    identity: DirectoryIdentity
    users: int = 0


class SharedDirectories:
    """One descriptor per directory for the PartialFiles given this object (a fetch's or a
    folder step's files): opened by the first that needs it, checked once, and closed
    when its last user closes. Each user works only relative to the descriptor it was
    lent, so a directory swapped for a symlink (or another directory) after the open is
    never entered: the batch's later files go on into the directory it opened.

    Why: a descriptor opened, checked and closed per file was 3 of a small file's ~12
    system calls, each giving up the GIL beside the event loop (issue 13).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, _Shared] = {}

    def acquire(self, path: str) -> tuple[int, DirectoryIdentity]:
        """The directory's descriptor, lent until ``release(path)``."""
        with self._lock:
            shared = self._open.get(path)
            if shared is None:
                fd, identity = open_directory(path)
                shared = self._open[path] = _Shared(fd, identity)
            shared.users += 1
            return shared.fd, shared.identity

    def release(self, path: str) -> None:
        with self._lock:
            shared = self._open[path]
            shared.users -= 1
            if shared.users == 0:
                del self._open[path]
                os.close(shared.fd)

    def open_count(self) -> int:
        """Descriptors open now (one per directory some user still holds)."""
        with self._lock:
            return len(self._open)
