"""Builders shared by the content-core tests: deterministic data and an in-memory folder."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from p2pfs.content.chunking import Chunker, ChunkRef
from p2pfs.content.folder import (
    DIR_TREE,
    FILE_TREE,
    FLAG_EXECUTABLE,
    DirEntry,
    EntryKind,
)
from p2pfs.content.tree import Child, build_tree
from p2pfs.ids import ContentHash


def random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def random_chunk_refs(seed: int, count: int) -> list[ChunkRef]:
    rng = random.Random(seed)
    return [ChunkRef(ContentHash(rng.randbytes(32)), rng.randint(1, 4096)) for _ in range(count)]


@dataclass
class MemoryFolder:
    """A folder as nested dicts: name -> bytes (a file), (bytes, True) (exec) or MemoryFolder."""

    entries: dict[str, object] = field(default_factory=dict)


def build_folder(
    tree: dict[str, object], nodes: dict[ContentHash, bytes], chunker: Chunker
) -> Child:
    """Build the directory tree of ``tree`` (nested dicts), keeping every node in ``nodes``."""
    entries = []
    for name, value in tree.items():
        if isinstance(value, dict):
            root = build_folder(value, nodes, chunker)
            entries.append(DirEntry(name, EntryKind.DIRECTORY, 0, root.size, root.hash))
            continue
        if isinstance(value, tuple):
            data, flags = value[0], FLAG_EXECUTABLE
        else:
            assert isinstance(value, bytes)
            data, flags = value, 0
        file_root, file_nodes = build_tree(FILE_TREE, chunker.chunk_refs(data))
        nodes.update(file_nodes)
        entries.append(DirEntry(name, EntryKind.FILE, flags, file_root.size, file_root.hash))
    entries.sort(key=lambda entry: entry.name.encode("utf-8"))
    root, dir_nodes = build_tree(DIR_TREE, entries)
    nodes.update(dir_nodes)
    return root
