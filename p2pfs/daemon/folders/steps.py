"""Blocking steps and small helpers of the folder engine (run in worker threads or the
index's thread): scanning, verifying records, placing directories and chunks, and the
per-phase timer the engine logs."""

from __future__ import annotations

import logging
import time

from p2pfs.content.chunking import ChunkRef
from p2pfs.errors import RemoteProtocolError, StorageError
from p2pfs.ids import ContentHash
from p2pfs.store import folderdisk
from p2pfs.store.assemble import Finished, PartialFile, fsync_directory
from p2pfs.store.index import IndexStore
from p2pfs.store.scanner import ScanResult, scan_share
from p2pfs.sync.ignore import IgnoreRules
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import IndexLeaf, SignedRecord, path_key, record_hash

logger = logging.getLogger(__name__)


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
    data: bytes,
    expected: ChunkRef | None,
    failed: set[str],
    path: str,
) -> None:
    """Write a chunk (verified against ``expected`` if given; a mismatch is the sender's
    fault and raises IntegrityError); a disk error fails only this file."""
    try:
        if expected is None:
            partial.write_verified(offset, data)
        else:
            partial.write_chunk(offset, data, expected)
    except StorageError as exc:
        logger.warning("cannot write %s: %s", partial.final_path, exc)
        failed.add(path)


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
    keys: FolderKeys, leaves: list[IndexLeaf], encoded: list[bytes]
) -> list[SignedRecord]:
    records = []
    for leaf, blob in zip(leaves, encoded, strict=True):
        if record_hash(blob) != leaf.record_hash:
            raise RemoteProtocolError("a record does not match its hash in the index tree")
        record = SignedRecord.decode_untrusted(blob, keys)
        if path_key(record.version.path) != leaf.path_key:
            raise RemoteProtocolError(f"record for {record.version.path!r} is misplaced")
        records.append(record)
    return records


def make_all_parents(folder: str, paths: list[str]) -> dict[str, str]:
    parents: dict[str, str] = {}
    for path in paths:
        try:
            parents[path] = folderdisk.make_parents(folder, path)
        except StorageError as exc:
            logger.warning("folder %s: cannot place %s: %s", folder, path, exc)
    return parents


def local_file_nodes(index: IndexStore, roots: list[ContentHash]) -> dict[ContentHash, bytes]:
    nodes: dict[ContentHash, bytes] = {}
    for root in dict.fromkeys(roots):
        found = index.file_tree_nodes(root)
        if found is not None:
            nodes.update(found)
    return nodes


ScannedFile = tuple[str, bytes, int, int, int, int]


def scan_folder(
    index: IndexStore, path: str, ignore: IgnoreRules
) -> tuple[ScanResult, list[ScannedFile], list[str]]:
    result = scan_share(path, index, ignore=ignore)
    files = [
        (f.path, bytes(f.root), f.size, f.mtime_ns, f.inode, f.mode)
        for f in index.share_files(result.share_id)
    ]
    return result, files, index.share_directories(result.share_id)
