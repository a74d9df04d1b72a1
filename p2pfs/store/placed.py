"""Files a sync download just placed, recorded in the scan index as a scan would have
(their content is known: the next scan reads none of them again, and their chunks can be
served at once)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from p2pfs.store.index import IndexStore, NewFile, signed64


@dataclass(frozen=True, slots=True)
class PlacedFile:
    """A file this node just wrote whose content it knows (a sync download)."""

    path: str
    """Relative to the share, ``/``-separated, as on disk."""
    size: int
    mtime_ns: int
    inode: int
    mode: int
    root: bytes
    chunks: bytes
    """Packed chunk list (32-byte id + 4-byte little-endian length per chunk)."""


def record_placed_files(index: IndexStore, share_path: str, placed: Sequence[PlacedFile]) -> None:
    """Record files as a scan would have, so the next scan reads none of them again (unless
    they are racily clean) and their chunks can be served at once."""
    if not placed:
        return
    top = os.path.realpath(share_path)
    share = index.share_for_path(top, time.time_ns())
    dir_ids: dict[str, int] = {}

    def directory(rel: str) -> int:
        if rel in dir_ids:
            return dir_ids[rel]
        parent_rel, _, _name = rel.rpartition("/")
        parent = None if rel == "" else directory(parent_rel)
        disk_path = os.path.join(top, *rel.split("/")) if rel else top
        dir_id, _tree, _digest = index.visit_dir(share.id, disk_path, rel, parent)
        dir_ids[rel] = dir_id
        return dir_id

    by_dir: dict[str, list[PlacedFile]] = {}
    for item in placed:
        by_dir.setdefault(item.path.rpartition("/")[0], []).append(item)
    with index.transaction():
        new_files: list[NewFile] = []
        for rel, items in by_dir.items():
            dir_id = directory(rel)
            rows = index.dir_files(dir_id)
            for item in items:
                name = item.path.rpartition("/")[2]
                row = rows.get(name)
                inode = signed64(item.inode)
                fields = (item.size, item.mtime_ns, inode, item.mode, item.root, item.chunks)
                if row is None:
                    # Just written: no settled ctime, so its chunks are hashed when served.
                    new_files.append((dir_id, name, *fields, None))
                else:
                    index.update_file(row[0], *fields)
            index.invalidate_dir(dir_id)
        index.add_files(new_files)
