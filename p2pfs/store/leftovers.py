"""Temp files left by earlier attempts at a folder's downloads, taken up by the next one.

A download that does not finish leaves its temp file: a batch its member refused, a link
that dropped, a kill, or a commit refused because the file changed locally meanwhile (the
download is whole and verified, and is wanted again as the conflict copy). The next attempt
keeps what they hold instead of fetching it again: its own temp file's chunks are verified
again in place, and a temp file of the same content under another name in the directory
is copied from (verified chunk by chunk) and then removed. One that no attempt takes up
for LEFTOVER_KEEP (its file changed again elsewhere meanwhile) is removed after a full scan
saw it, as Syncthing removes its temp files after 24 h.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

from p2pfs.content.chunking import ChunkRef
from p2pfs.errors import StorageError
from p2pfs.store.assemble import PartialFile, is_partial_name, partial_content

logger = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)

LEFTOVER_KEEP = 24 * 3600.0
"""Seconds a temp file untouched is kept for an attempt to take it up (by its ctime: a whole
temp file has its version's mtime, however old, and no one can set a ctime)."""
_OPEN_LEFTOVER = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def take_leftovers(
    partials: Mapping[Key, PartialFile],
    leaves_of: Mapping[Key, Sequence[tuple[int, ChunkRef]]],
) -> dict[Key, set[int]]:
    """The offsets each file already holds from a leftover temp file, verified. Each
    directory is listed once (no failed open per file of a join)."""
    listings: dict[str, dict[str, list[str]]] = {}
    held: dict[Key, set[int]] = {}
    for key, partial in partials.items():
        leaves = leaves_of.get(key)
        if not leaves:
            continue
        temps = listings.get(partial.directory)
        if temps is None:
            temps = listings[partial.directory] = _temps_by_content(partial.directory)
        same = temps.get(partial_content(partial.temp_name))
        if not same:
            continue
        try:
            got = _take_up(partial, same, leaves)
        except StorageError as exc:
            logger.info("not taking up %s: %s", partial.temp_path, exc)
            continue
        if got:
            held[key] = got
    return held


def _take_up(
    partial: PartialFile, same: list[str], leaves: Sequence[tuple[int, ChunkRef]]
) -> set[int]:
    if partial.temp_name in same:
        return partial.verified_chunks(leaves)
    for donor in same:
        got = partial.take_from(donor, leaves)
        if got:
            return got
    return set()


def _temps_by_content(directory: str) -> dict[str, list[str]]:
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    temps: dict[str, list[str]] = {}
    for name in names:
        if is_partial_name(name):
            temps.setdefault(partial_content(name), []).append(name)
    return temps


def remove_stale(paths: Sequence[str], now: float, keep: float = LEFTOVER_KEEP) -> list[str]:
    """Remove the temp files among ``paths`` untouched for ``keep`` seconds before ``now``
    (wall clock), each only if it is still a regular file of ours that no one holds (a
    download in progress locks its temp file). Returns the paths removed."""
    removed = []
    for path in paths:
        if not is_partial_name(os.path.basename(path)):
            continue
        try:
            fd = os.open(path, _OPEN_LEFTOVER)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_uid != os.geteuid()
                or st.st_ctime > now - keep
            ):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a download holds it
            with contextlib.suppress(OSError):
                named = os.lstat(path)
                if (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(path)
                    removed.append(path)
        finally:
            os.close(fd)
    return removed
