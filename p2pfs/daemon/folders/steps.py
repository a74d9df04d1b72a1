"""Blocking steps and small helpers of the folder engine (run in worker threads or the
index's thread): scanning, verifying records, placing directories and chunks, renames,
deletes and commits of placed files (each refused where the path changed since the
scan), and the per-phase timer the engine logs."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Mapping

from p2pfs.content.chunking import ChunkRef, chunk_id
from p2pfs.errors import IntegrityError, RemoteProtocolError, StorageError
from p2pfs.ids import ContentHash
from p2pfs.store import folderdisk
from p2pfs.store.assemble import Finished, PartialFile, commit_files, fsync_directory
from p2pfs.store.index import CHUNK_RECORD, IndexStore
from p2pfs.store.partscan import PartScan, scan_directories
from p2pfs.store.scanner import FilesSeen, ScanResult, scan_share
from p2pfs.sync.ignore import IgnoreRules
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import IndexLeaf, SignedRecord, path_key, record_hash
from p2pfs.sync.versions import FileVersion

logger = logging.getLogger(__name__)

_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
COMMIT_BATCH = 512
"""Files renamed into place per durable commit."""


class Phases:
    """Wall time per phase of one reconcile, for the log (where a slow sync spends it)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._spent: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self._spent[phase] = self._spent.get(phase, 0.0) + now - self._last
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{phase} {seconds:.3f}s" for phase, seconds in self._spent.items())


def paths(folder: str, finished: list[Finished]) -> list[tuple[str, Finished]]:
    prefix = folder.rstrip("/") + "/"
    return [(item.partial.final_path[len(prefix) :].replace("\\", "/"), item) for item in finished]


def sync_directories(directories: set[str]) -> None:
    for directory in directories:
        try:
            fsync_directory(directory)
        except OSError as exc:
            logger.warning("cannot sync directory %s: %s", directory, exc)


def write_or_fail(
    partial: PartialFile,
    offset: int,
    data: bytes | memoryview,
    expected: ChunkRef | None,
    failed: dict[str, str],
    path: str,
) -> None:
    """Write a chunk (verified against ``expected`` if given; a mismatch is the sender's
    fault and raises IntegrityError); a disk error fails only this file (path -> why)."""
    try:
        if expected is None:
            partial.write_verified(offset, data)
        else:
            partial.write_chunk(offset, data, expected)
    except StorageError as exc:
        logger.warning("cannot write %s: %s", partial.final_path, exc)
        failed[path] = str(exc)


def verify_chunk(ref: ChunkRef, data: bytes | memoryview) -> None:
    """A member's chunk must be the one asked for (else it sent bad data: IntegrityError)."""
    if len(data) != ref.length or chunk_id(data) != ref.id:
        raise IntegrityError(f"chunk {ref.id.hex()[:12]} from the member fails its hash")


def write_parts(
    partial: PartialFile,
    parts: list[tuple[int, bytes | memoryview]],
    whole: FileVersion | None,
    failed: dict[str, str],
    path: str,
) -> None:
    """Write verified chunks (offset, bytes) of one file; ``whole``: they are all of it,
    with this version's metadata, so a new file is written in one step (created,
    written, given its mode and mtime, closed: PartialFile.write_new). A disk error
    fails only this file."""
    try:
        if whole is not None and partial.write_new(parts, whole.executable, whole.mtime_ns):
            return
        for offset, data in parts:
            partial.write_verified(offset, data)
    except StorageError as exc:
        logger.warning("cannot write %s: %s", partial.final_path, exc)
        failed[path] = str(exc)


def copy_from_previous(
    folder: str,
    path: str,
    partial: PartialFile,
    previous: bytes,
    leaves: list[tuple[int, ChunkRef]],
) -> set[int]:
    """The chunks of ``leaves`` that the file now at ``path`` held in its previous version
    (chunk list ``previous``), copied from it in runs of consecutive chunks (an edit
    leaves long runs: everything before and after it), each chunk verified before it is
    written; returns the offsets done. A disk error or a changed file only leaves chunks to the
    general path (any local file, then the member)."""
    old_offsets: dict[bytes, int] = {}
    position = 0
    for cid, length in CHUNK_RECORD.iter_unpack(previous):
        old_offsets.setdefault(cid, position)
        position += length
    runs: list[tuple[int, int, int, list[ChunkRef]]] = []
    """(source offset, target offset, length, chunks)"""
    for offset, ref in leaves:
        source = old_offsets.get(ref.id)
        if source is None:
            continue
        if runs:
            run_source, run_target, run_length, refs = runs[-1]
            if run_source + run_length == source and run_target + run_length == offset:
                refs.append(ref)
                runs[-1] = (run_source, run_target, run_length + ref.length, refs)
                continue
        runs.append((source, offset, ref.length, [ref]))
    if not runs or folderdisk.state_of(folder, path) in (None, folderdisk.NOT_A_FILE):
        return set()
    done: set[int] = set()
    try:
        fd = os.open(folderdisk.local_path(folder, path), _OPEN_READ)
    except OSError:
        return done
    try:
        for source, target, _length, refs in runs:
            done |= partial.copy_chunks(fd, source, target, refs)
    except StorageError as exc:
        logger.info("folder %s: copying from the old %s: %s", folder, path, exc)
    finally:
        os.close(fd)
    return done


def chunk_lists(index: IndexStore, roots: dict[str, ContentHash | None]) -> dict[str, bytes]:
    found = {}
    for path, root in roots.items():
        packed = index.file_chunks(root) if root is not None else None
        if packed is not None:
            found[path] = packed
    return found


def make_directories(folder: str, paths: list[str]) -> set[str]:
    made: set[str] = set()
    for path in sorted(paths, key=lambda p: p.count("/")):
        try:
            folderdisk.make_directory(folder, path)
        except StorageError as exc:
            logger.warning("folder %s: cannot make directory %s: %s", folder, path, exc)
            continue
        made.add(path)
    return made


def verify_records(
    keys: FolderKeys, leaves: list[IndexLeaf], encoded: list[bytes], vouched: bool = False
) -> list[SignedRecord]:
    """Each record checked against its leaf; ``vouched``: the leaves are of a tree whose
    root the write key signed, so its own signature is not checked again."""
    records = []
    for leaf, blob in zip(leaves, encoded, strict=True):
        if record_hash(blob) != leaf.record_hash:
            raise RemoteProtocolError("a record does not match its hash in the index tree")
        record = SignedRecord.decode_untrusted(blob, keys, vouched=vouched)
        if path_key(record.version.path) != leaf.path_key:
            raise RemoteProtocolError(f"record for {record.version.path!r} is misplaced")
        records.append(record)
    return records


def make_all_parents(folder: str, paths: list[str]) -> dict[str, str]:
    """Each path's parent directory, made where missing (never through a symlink); a path
    whose parent cannot be made is left out (logged). Each directory is checked once a
    call (its files were two lstat calls each, on every file of a join)."""
    parents: dict[str, str] = {}
    made: dict[str, str | None] = {}
    for path in paths:
        directory = path.rpartition("/")[0]
        if directory not in made:
            try:
                made[directory] = folderdisk.make_parents(folder, path)
            except StorageError as exc:
                logger.warning("folder %s: cannot place %s: %s", folder, path, exc)
                made[directory] = None
        parent = made[directory]
        if parent is not None:
            parents[path] = parent
    return parents


def local_file_nodes(index: IndexStore, roots: list[ContentHash]) -> dict[ContentHash, bytes]:
    nodes: dict[ContentHash, bytes] = {}
    for found in index.file_trees_many(list(dict.fromkeys(roots))).values():
        nodes.update(found)
    return nodes


def scan_folder(
    index: IndexStore, path: str, ignore: IgnoreRules, on_files: FilesSeen
) -> tuple[ScanResult, list[str]]:
    """A full scan of the folder: ``on_files`` is told each directory's files (in this
    thread, see :func:`scan_share`); returns the result and the directories found."""
    # Without patterns the rules leave out only the state directory and temp files, which
    # the scanner leaves out itself: not asking them of every file spares ~15% of an
    # unchanged rescan.
    rule = ignore if ignore.spec is not None else None
    result = scan_share(path, index, ignore=rule, on_files=on_files)
    return result, index.share_directories(result.share_id)


def scan_folder_part(
    index: IndexStore,
    path: str,
    ignore: IgnoreRules,
    paths: Collection[str],
    directories: Collection[str] = (),
) -> PartScan | None:
    """Rescan only ``directories`` and the directories of ``paths`` (a watcher's events)
    that changed; None where a full scan must run."""
    return scan_directories(path, index, directories, ignore=ignore, changed_paths=paths)


def rename_files(
    folder: str,
    scanned: Mapping[str, folderdisk.DiskState],
    moves: dict[str, tuple[str, FileVersion]],
    chunk_lists: dict[str, bytes],
) -> dict[str, tuple[os.stat_result, bytes]]:
    """Renames planned as a fetch plus a delete of the same content: new -> (old, version).
    Each happens only if both paths are as scanned; returns new -> (stat, chunk list)."""
    done: dict[str, tuple[os.stat_result, bytes]] = {}
    for new, (old, version) in moves.items():
        packed = chunk_lists.get(new)
        if packed is None:
            continue
        if folderdisk.state_of(folder, old) != scanned.get(old):
            continue  # the old file changed: fetch the new one normally
        if folderdisk.state_of(folder, new) != scanned.get(new):
            continue
        try:
            folderdisk.make_parents(folder, new)
            if scanned.get(new) is not None:
                folderdisk.keep_version(folder, new, move=False)
            target = folderdisk.local_path(folder, new)
            os.rename(folderdisk.local_path(folder, old), target)
            mode = 0o755 if version.executable else 0o644
            os.chmod(target, mode & ~folderdisk.UMASK)
            os.utime(target, ns=(version.mtime_ns, version.mtime_ns))
            fsync_directory(os.path.dirname(target))
        except (OSError, StorageError) as exc:
            logger.warning("folder %s: cannot rename %s to %s: %s", folder, old, new, exc)
            continue
        done[new] = (os.lstat(target), packed)
    return done


def delete_paths(
    folder: str,
    scanned: Mapping[str, folderdisk.DiskState],
    paths: list[str],
    directories: Collection[str],
) -> set[str]:
    """Delete ``paths`` (those in ``directories`` are directories); returns those done."""
    done = _delete_regular_files(folder, scanned, [p for p in paths if p not in directories])
    # Deepest first, after the files: a directory goes once what it held is gone. One
    # still holding something is not done: its delete is not recorded, and the next
    # reconcile plans it again. What it holds may be the rest of the deleted tree, whose
    # records come in a later batch (a member's watcher can report one rmtree in two
    # bursts): counted done here, the emptied directories stayed behind with their
    # deletes recorded, and the next full scan sent them back to the member that had
    # deleted them. Or a local file not synced yet: content wins over a delete (once
    # synced, the member that deleted the directory makes it again for the file). Or
    # files ignored here: the directory stays until they go (FolderSync.undeleted).
    for path in sorted(
        (p for p in paths if p in directories), key=lambda p: p.count("/"), reverse=True
    ):
        if folderdisk.remove_directory(folder, path) or not folderdisk.holds_directory(
            folder, path
        ):
            done.add(path)
    return done


def _delete_regular_files(
    folder: str, scanned: Mapping[str, folderdisk.DiskState], paths: list[str]
) -> set[str]:
    done: set[str] = set()
    touched: set[str] = set()
    for path in paths:
        now = folderdisk.state_of(folder, path)
        if now is not None and now != scanned.get(path):
            logger.info("folder %s: %s changed locally; not deleting it", folder, path)
            continue
        if now is not None:
            try:
                kept = folderdisk.keep_version(folder, path, move=True)
            except StorageError as exc:
                logger.warning("folder %s: not deleting %s: %s", folder, path, exc)
                continue
            touched.add(os.path.dirname(folderdisk.local_path(folder, path)))
            if kept is not None:
                touched.add(os.path.dirname(folderdisk.local_path(folder, kept)))
        done.add(path)
    sync_directories(touched)  # the deletes are durable before their records are
    return done


def commit_placed(
    folder: str,
    scanned: Mapping[str, folderdisk.DiskState],
    finished: list[Finished],
    conflict_moves: Mapping[str, str],
) -> tuple[dict[str, os.stat_result], dict[str, str]]:
    """Rename each file into place unless its path changed on disk since the scan;
    returns the placed paths with their new stat, and the paths that failed (why).
    A path that fails (a directory in its way) fails alone: the batch goes on."""
    by_final = {item.partial.final_path: path for path, item in paths(folder, finished)}
    placed: dict[str, os.stat_result] = {}
    unplaced: dict[str, str] = {}
    kept_dirs: set[str] = set()

    def on_error(item: Finished, exc: StorageError) -> None:
        path = by_final[item.partial.final_path]
        logger.warning("folder %s: not placing %s: %s", folder, path, exc)
        unplaced[path] = str(exc)

    def before_replace(item: Finished) -> bool:
        try:
            return prepare_replace(item)
        except StorageError as exc:
            logger.warning("folder %s: not placing %s: %s", folder, item.partial.final_path, exc)
            return False

    def prepare_replace(item: Finished) -> bool:
        path = by_final[item.partial.final_path]
        # Looked up in the directory the file is renamed into, by the descriptor it holds:
        # one lstat, not one for each directory on the path (every file of a join).
        try:
            now = folderdisk.state_from_stat(item.partial.final_state())
        except StorageError:
            now = folderdisk.NOT_A_FILE  # unreadable, a name too long here...: left alone
        if now == folderdisk.NOT_A_FILE:
            # A directory (or symlink, or something unreadable) where the record has a
            # file: never replaced; reported, and retried once it is gone.
            unplaced[path] = "something that is not a regular file is in the way"
            return False
        if now != scanned.get(path):
            logger.info("folder %s: %s changed locally during the download", folder, path)
            return False
        if now is not None:
            copy = conflict_moves.get(path)
            # The loser (ours) stays as the conflict copy, else as a kept version; a
            # link, so the path holds the old file until the rename replaces it.
            if copy is not None:
                if not folderdisk.link_within(folder, path, copy):
                    return False
            else:
                kept = folderdisk.keep_version(folder, path, move=False)
                if kept is not None:
                    kept_dirs.add(os.path.dirname(folderdisk.local_path(folder, kept)))
        return True

    for start in range(0, len(finished), COMMIT_BATCH):
        batch = finished[start : start + COMMIT_BATCH]
        for item in commit_files(batch, before_replace, on_error):
            try:
                placed[by_final[item.partial.final_path]] = os.lstat(item.partial.final_path)
            except OSError:
                continue  # gone again already: the next scan sees what is there
    sync_directories(kept_dirs)
    return placed, unplaced
