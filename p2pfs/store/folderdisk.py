"""Blocking file-system steps of a sync folder (run in worker threads): its marker, the
ignore file, kept versions, and placing and removing paths safely.

Every step keeps the rule "each file is old or new, never torn, and nothing is lost":
a replaced file is hard-linked into ``.p2pfs/versions/`` before the new one is renamed over
it; a deleted file is renamed there; a conflict loser is renamed to its conflict name.
Parents are created as real directories and never followed through a symbolic link, so a
remote path cannot write outside the folder.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from p2pfs.errors import StorageError
from p2pfs.store.assemble import umask as _read_umask
from p2pfs.store.index import IndexStore
from p2pfs.sync.ignore import IGNORE_FILE, STATE_DIR, IgnoreRules, parents

logger = logging.getLogger(__name__)

VERSIONS_DIR = f"{STATE_DIR}/versions"
MARKER = f"{STATE_DIR}/folder"
"""Made when a folder is created or joined. Without it the folder is not scanned: an
unmounted disk or a deleted directory must not read as "every file was deleted"."""
DEFAULT_KEEP_VERSIONS_S = 30 * 24 * 3600
UMASK = _read_umask()
_STAMP_TAIL = re.compile(r"(\d{8}-\d{6})(?:-\d+)?(\.[^./]*)?")
"""What follows the ``~`` of a kept version's name: the stamp, an optional ``-N`` and the
original extension (which holds exactly one dot, at its start; see :func:`version_path`)."""
MAX_EXT_BYTES = 32


@dataclass(frozen=True, slots=True)
class DiskState:
    """What a path held when it was last scanned: used to refuse touching a file that has
    changed since (the user's edit always wins over a download in flight)."""

    size: int
    mtime_ns: int
    inode: int


class IgnoreFile:
    """The folder's ``.p2pfsignore``, read again only when its (mtime, size) changed."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._rules = IgnoreRules()
        self._loaded: tuple[int, int] | None = None

    def load(self) -> IgnoreRules:
        """The rules as the file now says (none if it is missing or unreadable)."""
        path = os.path.join(self.folder, IGNORE_FILE)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._rules, self._loaded = IgnoreRules(), None
            return self._rules
        key = (st.st_mtime_ns, st.st_size)
        if key == self._loaded:
            return self._rules
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                self._rules = IgnoreRules.parse(handle.read())
        except (OSError, ValueError) as exc:
            logger.warning("cannot read %s: %s; ignoring nothing", path, exc)
            self._rules = IgnoreRules()
        self._loaded = key
        return self._rules


def write_marker(folder: str) -> None:
    os.makedirs(os.path.join(folder, STATE_DIR), exist_ok=True)
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as handle:
        handle.write("This directory is a p2pfs sync folder. Do not delete this file.\n")
        handle.flush()
        os.fsync(handle.fileno())


def has_marker(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def ignores_case(folder: str) -> bool:
    """Whether the folder's file system treats names differing only by case as one (probed
    in the state directory; a folder without one, e.g. not mounted, is not written to)."""
    probe_dir = os.path.join(folder, STATE_DIR)
    if not os.path.isdir(probe_dir):
        return False
    name = f"case-probe-{os.getpid()}"
    probe = os.path.join(probe_dir, name)
    with open(probe, "w"):
        pass
    try:
        return os.path.exists(os.path.join(probe_dir, name.upper()))
    finally:
        os.unlink(probe)


def local_path(folder: str, path: str) -> str:
    return os.path.join(folder, *path.split("/"))


NOT_A_FILE = DiskState(-1, 0, 0)
"""What a path holds when it is no regular file reached through real directories: never
equal to a scanned state, so nothing there is replaced or deleted."""


def scanned_states(index: IndexStore, folder: str, paths: Iterable[str]) -> dict[str, DiskState]:
    """What the scan index says ``paths`` held when last scanned or placed (those with a
    regular file then): the folder keeps no state per file in memory, it asks here (in the
    index's thread) just before it replaces, renames or deletes those files."""
    top = os.path.realpath(folder)
    return {
        path: DiskState(size, mtime_ns, inode)
        for path, (_id, size, mtime_ns, inode) in index.files_at(top, paths).items()
    }


def scanned_paths(index: IndexStore, folder: str) -> set[str]:
    """Every path with a file as last scanned or placed (what a plan on a file system that
    ignores case checks its placements against)."""
    share_id = index.share_id_at(os.path.realpath(folder))
    return set() if share_id is None else {s[0] for s in index.share_file_states(share_id)}


def state_of(folder: str, path: str) -> DiskState | None:
    """The path's regular file as (size, mtime, inode); None if nothing is there."""
    try:
        current = folder
        for part in path.split("/")[:-1]:
            current = os.path.join(current, part)
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                return NOT_A_FILE  # a symlink (or file) in the way: never reach through it
        st = os.lstat(local_path(folder, path))
    except FileNotFoundError:
        return None
    except OSError:
        return NOT_A_FILE  # unreadable, a name too long here...: leave it alone
    return state_from_stat(st)


def state_from_stat(st: os.stat_result | None) -> DiskState | None:
    """An lstat's result as a DiskState (None: nothing there)."""
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        return NOT_A_FILE
    return DiskState(st.st_size, st.st_mtime_ns, st.st_ino)


def make_parents(folder: str, path: str) -> str:
    """Create ``path``'s parent directories (never through a symlink); return the parent."""
    current = folder
    for part in path.split("/")[:-1]:
        current = os.path.join(current, part)
        try:
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(current, 0o755)
                st = os.lstat(current)
        except OSError as exc:
            raise StorageError(f"cannot create {current}: {exc.strerror or exc}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"{current} is not a directory; cannot place {path!r} under it")
    return current


def version_path(folder: str, path: str, now: float | None = None) -> str:
    """Where the current file at ``path`` is kept: ``.p2pfs/versions/dir/name~STAMP.ext``."""
    # Whole seconds first: fromtimestamp rounds to microseconds, and 1.9999995 must stamp
    # second 1, not 2 (the stamp says when, to the second, and expiry reads it back).
    seconds = int(time.time() if now is None else now)
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    stamp = when.strftime("%Y%m%d-%H%M%S")
    directory, _, name = path.rpartition("/")
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    if len(ext.encode("utf-8")) > MAX_EXT_BYTES:
        stem, ext = name, ""
    # Room for "~YYYYMMDD-HHMMSS-NNN" and the extension within 255 bytes.
    budget = 255 - len(ext.encode("utf-8")) - 24
    stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore")
    base = f"{VERSIONS_DIR}/{directory + '/' if directory else ''}{stem}~{stamp}"
    candidate = f"{base}{ext}"
    number = 1
    while os.path.lexists(local_path(folder, candidate)):
        number += 1
        candidate = f"{base}-{number}{ext}"
    return candidate


def keep_version(folder: str, path: str, *, move: bool) -> str | None:
    """Keep the file at ``path`` under versions/ (a hard link, or a rename if ``move``)."""
    source = local_path(folder, path)
    if not os.path.lexists(source):
        return None
    try:
        kept = version_path(folder, path)
    except OSError as exc:
        raise StorageError(f"cannot keep a version of {source}: {exc.strerror or exc}") from exc
    target = local_path(folder, kept)
    make_parents(folder, kept)
    try:
        if move:
            os.rename(source, target)
        else:
            try:
                os.link(source, target, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                    raise
                _copy(source, target)  # a file system without hard links
    except OSError as exc:
        raise StorageError(f"cannot keep a version of {source}: {exc.strerror or exc}") from exc
    return kept


def _copy(source: str, target: str) -> None:
    with open(source, "rb") as reader, open(target + ".tmp", "wb") as writer:
        while block := reader.read(1 << 20):
            writer.write(block)
        os.fsync(writer.fileno())
    os.replace(target + ".tmp", target)


def make_directory(folder: str, path: str) -> None:
    """A directory at ``path`` (parents too), never through a symlink."""
    make_parents(folder, f"{path}/-")


def remove_directory(folder: str, path: str) -> bool:
    """Remove the directory at ``path`` if it is a real one and empty."""
    if state_of(folder, f"{path}/-") == NOT_A_FILE:
        return False  # a parent is not a real directory: leave it alone
    target = local_path(folder, path)
    try:
        if not stat.S_ISDIR(os.lstat(target).st_mode):
            return False
        os.rmdir(target)
    except OSError:
        return False
    return True


def holds_directory(folder: str, path: str) -> bool:
    """A real directory is at ``path``, reached through real directories only."""
    if state_of(folder, f"{path}/-") == NOT_A_FILE:
        return False
    try:
        return stat.S_ISDIR(os.lstat(local_path(folder, path)).st_mode)
    except OSError:
        return False


def link_within(folder: str, source: str, target: str) -> bool:
    """Give the file at ``source`` a second name ``target`` (unless ``target`` exists)."""
    make_parents(folder, target)
    destination = local_path(folder, target)
    source_path = local_path(folder, source)
    try:
        if os.path.lexists(destination):
            # Done before (a crash between this link and the replace that follows it).
            return os.path.samefile(source_path, destination)
        try:
            os.link(source_path, destination, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                raise
            _copy(source_path, destination)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot link {destination}: {exc.strerror or exc}") from exc
    return True


def version_stamp(name: str) -> datetime.datetime | None:
    """When a kept version was made, from the suffix :func:`version_path` gave its name.

    A user's own name may hold a ``~YYYYMMDD-HHMMSS`` too (the stem is the user's), so the
    stamp is the first ``~`` whose whole remainder is exactly what p2pfs appends: the
    stamp, ``-N``, and an extension of one dot and at most 32 bytes. A stamp that is no
    real date (``~20261399-999999``) reads as None: such a file is never expired.
    """
    start = name.find("~")
    while start >= 0:
        match = _STAMP_TAIL.fullmatch(name, start + 1)
        if match is not None and len((match.group(2) or "").encode("utf-8")) <= MAX_EXT_BYTES:
            try:
                when = datetime.datetime.strptime(match.group(1), "%Y%m%d-%H%M%S")
            except ValueError:
                return None
            return when.replace(tzinfo=datetime.UTC)
        start = name.find("~", start + 1)
    return None


def expire_versions(folder: str, keep_seconds: float, now: float | None = None) -> int:
    """Delete kept versions older than ``keep_seconds`` (by the stamp in their name).

    Names that carry no stamp p2pfs wrote are left alone; only OSError can escape (a
    directory that cannot be walked), and callers treat that as "try again next time".
    """
    top = local_path(folder, VERSIONS_DIR)
    limit = (time.time() if now is None else now) - keep_seconds
    removed = 0
    for directory, _dirs, files in os.walk(top, topdown=False):
        for name in files:
            when = version_stamp(name)
            if when is None or when.timestamp() >= limit:
                continue
            try:
                os.unlink(os.path.join(directory, name))
            except OSError as exc:
                logger.info("cannot expire %s: %s", name, exc)
                continue
            removed += 1
        if directory != top:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
    return removed


def problem_paths(folder: str, problems: list[str]) -> Callable[[str], bool]:
    """A predicate: is this relative path at or below a path the scanner could not read?"""
    prefix = os.path.realpath(folder) + os.sep
    bad = set()
    for shown in problems:
        if shown.startswith(prefix):
            bad.add(shown[len(prefix) :].replace(os.sep, "/"))

    def unreadable(path: str) -> bool:
        return path in bad or any(parent in bad for parent in parents(path))

    return unreadable
