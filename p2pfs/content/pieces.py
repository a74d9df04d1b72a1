"""Pieces: a share's unique chunks in tree order, the numbering swarming peers share.

Tree order is depth-first pre-order with entries by UTF-8 name (so sorting file paths by
their components gives it), each file's chunks in file order; a chunk that occurs twice is
the piece where it first occurs. Every holder of the root computes the same list.
"""

from __future__ import annotations

from collections.abc import Iterable

from p2pfs.content.chunking import ChunkRef


def tree_order_key(path: str) -> tuple[bytes, ...]:
    """Sort key of a ``/``-joined path that yields depth-first pre-order by name."""
    return tuple(part.encode("utf-8") for part in path.split("/"))


def unique_pieces(chunk_lists: Iterable[Iterable[ChunkRef]]) -> list[ChunkRef]:
    """The pieces of files given in tree order."""
    seen: set[bytes] = set()
    pieces: list[ChunkRef] = []
    for chunks in chunk_lists:
        for ref in chunks:
            if ref.id not in seen:
                seen.add(ref.id)
                pieces.append(ref)
    return pieces
