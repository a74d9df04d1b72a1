"""Partial scans: only the directories a file-system watcher named are listed again, at a
cost of O(their entries) whatever the share's size; the periodic full scan
(:func:`p2pfs.store.scanner.scan_share`) stays the safety net."""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker
from p2pfs.content.names import normalize_local_name
from p2pfs.content.tree import Child
from p2pfs.errors import InvalidNameError
from p2pfs.ids import ContentHash
from p2pfs.store.filehash import BLOCK_SIZE, FileChanged, hash_file_once
from p2pfs.store.index import FileRow, IndexStore, signed64
from p2pfs.store.scanner import (
    RACY_WINDOW_NS,
    DirResult,
    IgnoreRule,
    Problem,
    Scan,
    ScanStats,
)


class _TargetMoved(Exception):
    """A directory a partial scan was to list is gone or not a directory any more."""


@dataclass(slots=True)
class PartScan:
    """What a partial scan (:func:`scan_directories`) saw: its scope and what is in it."""

    files: list[tuple[str, bytes, int, int, int, int]] = field(default_factory=list)
    """(path, root, size, mtime_ns, inode, mode) of every file in scope."""
    directories: list[str] = field(default_factory=list)
    """Subdirectories in scope (rel paths)."""
    shallow: list[str] = field(default_factory=list)
    """Directories whose own entries were rescanned: their direct children are in scope."""
    deep: list[str] = field(default_factory=list)
    """Directories scanned whole (new) or dropped (gone): everything below is in scope."""
    problems: list[Problem] = field(default_factory=list)
    stats: ScanStats = field(default_factory=ScanStats)
    ignored: list[str] = field(default_factory=list)
    """Files and directories in scope the ignore rule left out (rel paths)."""


MAX_PARTIAL_DIRECTORIES = 256
"""More directories than this named at once: a full scan is cheaper than many small ones."""


def scan_directories(
    path: str | os.PathLike[str],
    index: IndexStore,
    directories: Collection[str],
    *,
    ignore: IgnoreRule | None = None,
    chunker: Chunker | None = None,
    changed_paths: Collection[str] = (),
) -> PartScan | None:
    """Rescan only the named directories' own entries (on-disk paths inside the share), as a
    file-system watcher reports them: their files are reused or hashed as in a full scan, a
    new subdirectory is scanned whole, one gone from disk is dropped with all below. Costs
    O(entries of those directories), whatever the share's size.

    The share's root, manifest and scan time are left as the last full scan made them
    (the periodic full scan recomputes them cheaply from the directory caches, which this
    invalidates where it changed something). Returns None where only a full scan will do:
    none completed yet, too many directories, or a path that cannot be resolved.

    ``changed_paths`` are on-disk paths a watcher reported (files, directories, gone
    ones): the directory of each is listed again unless the path is a file its index row
    still describes (see :func:`changed_directories`), as files this node placed itself are.
    """
    top = os.path.realpath(os.fspath(path))
    share = index.share_for_path(top, time.time_ns())
    if share.root is None or share.scan_started_ns is None:
        return None
    racy_limit = share.scan_started_ns - RACY_WINDOW_NS
    chunker = chunker or Chunker(DEFAULT_CHUNKER)
    if changed_paths:
        directories = {
            *directories,
            *changed_directories(index, share.id, changed_paths, racy_limit, chunker),
        }
    targets = _resolve_targets(index, share.id, top, directories, ignore)
    if targets is None or len(targets) > MAX_PARTIAL_DIRECTORIES:
        return None
    scan = Scan(
        index,
        share.id,
        share.scan_generation,
        racy_limit,
        chunker,
        None,
        None,
        ignore,
    )
    scan.visited = []
    part = PartScan(problems=scan.problems, stats=scan.stats, ignored=scan.ignored)
    try:
        for disk_path, (rel, dir_id) in sorted(targets.items(), key=lambda t: t[1][0].count("/")):
            if any(rel == d or rel.startswith(d + "/") for d in part.deep):
                continue  # inside a subtree this scan took whole already
            _scan_shallow(scan, disk_path, rel, dir_id, part)
        scan.commit()
    except _TargetMoved:
        scan.rollback()
        return None  # a directory moved under us: a full scan sorts it out
    except BaseException:
        scan.rollback()
        raise
    for dir_id, rel in scan.visited:
        prefix = f"{rel}/" if rel else ""
        for name, row in index.dir_files(dir_id).items():
            tree_name = name if name.isascii() else normalize_local_name(name)
            part.files.append((prefix + tree_name, row[5], row[1], row[2], row[3], row[4]))
        if rel and rel not in part.directories:
            part.directories.append(rel)
    return part


def sift_changed_paths(
    index: IndexStore, path: str | os.PathLike[str], paths: Iterable[str]
) -> set[str] | None:
    """:func:`changed_directories` of the share at ``path`` (the directories a later
    :func:`scan_directories` must list for these watcher paths); None before its first
    full scan. A file judged still indexed now needs no look later: a change after this
    call brings a new event."""
    share = index.share_for_path(os.path.realpath(os.fspath(path)), time.time_ns())
    if share.root is None or share.scan_started_ns is None:
        return None
    racy_limit = share.scan_started_ns - RACY_WINDOW_NS
    return changed_directories(index, share.id, paths, racy_limit, Chunker(DEFAULT_CHUNKER))


def changed_directories(
    index: IndexStore,
    share_id: int,
    paths: Iterable[str],
    racy_limit_ns: int,
    chunker: Chunker,
) -> set[str]:
    """The directories (on disk) of those ``paths`` a watcher reported that changed: all
    but the regular files the index row of their name still describes, as a scan would
    judge them (same size, mtime, inode and mode; a racily clean one read again and its
    content compared). Costs one lstat per path and one listing of the index per
    directory, no directory listing: the events for a join's thousands of placed files
    (each recorded as it was placed) cost no rescan at all."""
    by_dir: dict[str, list[str]] = {}
    for changed in paths:
        directory, _, name = os.path.normpath(changed).rpartition(os.sep)
        by_dir.setdefault(directory or os.sep, []).append(name)
    changed_dirs: set[str] = set()
    for directory, names in by_dir.items():
        dir_id = index.dir_id(share_id, directory)
        if dir_id is None:
            changed_dirs.add(directory)
            continue
        rows = index.dir_files(dir_id)
        for name in names:
            if not _still_indexed(
                os.path.join(directory, name), rows.get(name), racy_limit_ns, chunker
            ):
                changed_dirs.add(directory)
                break
    return changed_dirs


def _still_indexed(path: str, row: FileRow | None, racy_limit: int, chunker: Chunker) -> bool:
    """Whether the file at ``path`` is what ``row`` records (False if not a file now)."""
    if row is None:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if (row[1], row[2], row[3], row[4]) != (
        st.st_size,
        st.st_mtime_ns,
        signed64(st.st_ino),
        st.st_mode,
    ):
        return False
    if st.st_mtime_ns < racy_limit:
        return True
    # Racily clean (written within the timestamp tick of the last full scan, as a file
    # placed just after it may be): a small file is read again, a big one left to the scan.
    if st.st_size > BLOCK_SIZE:
        return False
    try:
        hashed = hash_file_once(path, chunker, _uncounted, _uncounted)
    except (FileChanged, OSError):
        return False
    return hashed.root == row[5] and hashed.mtime_ns == row[2] and hashed.size == row[1]


def _uncounted(_count: int) -> None:
    """A read nobody counts (a racily clean file checked against its row)."""


def _resolve_targets(
    index: IndexStore,
    share_id: int,
    top: str,
    directories: Collection[str],
    ignore: IgnoreRule | None,
) -> dict[str, tuple[str, int]] | None:
    """On-disk directory -> (rel, dir id) for each named directory, or the nearest recorded
    one above it (a directory made or removed since the last scan is found from its parent).
    None if a name cannot be a tree name (the full scan reports it)."""
    targets: dict[str, tuple[str, int]] = {}
    for directory in directories:
        disk_path = os.path.normpath(directory)
        while True:
            if disk_path != top and not disk_path.startswith(top + os.sep):
                return None
            dir_id = index.dir_id(share_id, disk_path)
            if dir_id is not None and os.path.isdir(disk_path) and not os.path.islink(disk_path):
                break
            if disk_path == top:
                return None
            disk_path = os.path.dirname(disk_path)
        if disk_path in targets:
            continue
        try:
            parts = [] if disk_path == top else disk_path[len(top) + 1 :].split(os.sep)
            rel = "/".join(normalize_local_name(name) for name in parts)
        except InvalidNameError:
            return None
        if rel and ignore is not None and ignore(rel, True):
            continue
        targets[disk_path] = (rel, dir_id)
    return targets


def _scan_shallow(scan: Scan, disk_path: str, rel: str, dir_id: int, part: PartScan) -> None:
    """Rescan one directory's own entries (a watcher named it): its files, new
    subdirectories whole, and subdirectories gone from disk dropped with all below."""
    try:
        with os.scandir(disk_path) as listing:
            entries = list(listing)
    except OSError as exc:
        raise _TargetMoved(disk_path) from exc
    files, subdirs = scan.list_entries(disk_path, rel, entries)
    del entries
    assert scan.visited is not None
    scan.visited.append((dir_id, rel))
    scan.scan_files(dir_id, disk_path, files, DirResult(Child(ContentHash(b""), 0)))
    known = scan.index.child_dirs(scan.share_id, disk_path)
    depth = rel.count("/") + 1 if rel else 0
    for name, tree_name in subdirs:
        child_rel = f"{rel}/{tree_name}" if rel else tree_name
        child_disk = os.path.join(disk_path, name)
        part.directories.append(child_rel)
        if known.pop(child_disk, None) is None:  # new here: scanned whole
            scan.scan_dir(child_disk, child_rel, depth + 1, dir_id)
            part.deep.append(child_rel)
    for child_disk, (_child_id, child_rel) in known.items():  # gone, or ignored now
        scan.remember_vanished(scan.write().forget_dir_tree(scan.share_id, child_disk))
        scan.write().invalidate_dir(dir_id)
        part.deep.append(child_rel)
    part.shallow.append(rel)
    scan.maybe_commit()
