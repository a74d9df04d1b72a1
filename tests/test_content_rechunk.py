"""Incremental re-chunking (content/rechunk.py) gives exactly the cuts of a full FastCDC
pass over the new bytes, whatever the edit and however the bytes arrive in blocks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker, ChunkerParams, ChunkRef
from p2pfs.content.rechunk import Rechunker, rechunk
from p2pfs.store.filehash import BLOCK_SIZE, hash_file_once, rechunk_file
from p2pfs.store.index import CHUNK_RECORD

BIG = Chunker(DEFAULT_CHUNKER)
SMALL = Chunker(ChunkerParams("fastcdc", "2020", 64, 256, 1024, 1))
"""The smallest sizes FastCDC accepts: many chunks (and max-size cuts) in a few KiB."""


def content(seed: int, size: int, kind: str) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "zeros":  # no content cut point at all: every cut is forced at max_size
        return bytes(size)
    # Repeated blocks: the same chunk ids at several places (dedup within a file).
    block = rng.randbytes(rng.randrange(300, 3000))
    return (block * (size // len(block) + 1))[:size]


Edit = tuple[str, float, int, bool]


def cuts(data: bytes) -> list[int]:
    offsets, position = [], 0
    for ref in SMALL.chunk_refs(data):
        position += ref.length
        offsets.append(position)
    return offsets


def apply(data: bytes, edits: list[Edit], seed: int) -> bytes:
    """Each edit at a fraction of the data, or (``snap``) exactly at a cut of the data as it
    stands: FastCDC's test for a cut reads the byte after it, the case to get right."""
    rng = random.Random(seed)
    for kind, where, length, snap in edits:
        at = int(where * len(data))
        if snap and (offsets := cuts(data)):
            at = offsets[int(where * (len(offsets) - 1))]
        if kind == "insert":
            data = data[:at] + rng.randbytes(length) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + length :]
        elif kind == "overwrite":
            patch = rng.randbytes(length)
            data = data[:at] + patch + data[at + len(patch) :]
        elif kind == "truncate":
            data = data[:at]
        else:  # append
            data = data + rng.randbytes(length)
    return data


edits_strategy = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "overwrite", "truncate", "append"]),
        st.floats(0, 1),
        st.integers(0, 5000),
        st.booleans(),
    ),
    max_size=4,
)


def fed_in_blocks(
    chunker: Chunker, old: list[ChunkRef], data: bytes, sizes: list[int]
) -> list[ChunkRef]:
    rechunker = Rechunker(chunker, old)
    out: list[ChunkRef] = []
    position = 0
    for size in sizes:
        out += rechunker.feed(data[position : position + size])
        position += size
    out += rechunker.feed(data[position:])
    return out + rechunker.finish()


@settings(max_examples=400, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    size=st.integers(0, 40_000),
    kind=st.sampled_from(["random", "zeros", "repeated"]),
    edits=edits_strategy,
    blocks=st.lists(st.integers(1, 9000), max_size=8),
)
def test_rechunk_equals_a_full_pass(
    seed: int, size: int, kind: str, edits: list[Edit], blocks: list[int]
) -> None:
    old_data = content(seed, size, kind)
    old = SMALL.chunk_refs(old_data)
    new_data = apply(old_data, edits, seed + 1)
    expected = SMALL.chunk_refs(new_data)
    assert rechunk(SMALL, old, new_data) == expected
    assert fed_in_blocks(SMALL, old, new_data, blocks) == expected


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    size=st.integers(0, 40_000),
    kind=st.sampled_from(["random", "zeros", "repeated"]),
    edits=edits_strategy,
    block_size=st.integers(1, 9000),
)
def test_a_file_rechunked_in_its_own_buffer_equals_a_full_pass(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    size: int,
    kind: str,
    edits: list[Edit],
    block_size: int,
) -> None:
    """store/filehash.py's rechunk_file: reads into one buffer, scans it in place and
    moves what the scan keeps to its front (no blocks joined); any block size gives the
    chunks of a full pass."""
    old_data = content(seed, size, kind)
    new_data = apply(old_data, edits, seed + 1)
    path = tmp_path_factory.mktemp("rechunk") / "f.bin"
    path.write_bytes(new_data)
    previous = b"".join(CHUNK_RECORD.pack(ref.id, ref.length) for ref in SMALL.chunk_refs(old_data))
    fd = os.open(path, os.O_RDONLY)
    try:
        packed = rechunk_file(fd, SMALL, previous, lambda _n: None, block_size)
    finally:
        os.close(fd)
    expected = SMALL.chunk_refs(new_data)
    assert packed == b"".join(CHUNK_RECORD.pack(ref.id, ref.length) for ref in expected)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    old_size=st.integers(0, 20_000),
    new_size=st.integers(0, 20_000),
    blocks=st.lists(st.integers(1, 5000), max_size=6),
)
def test_rechunk_against_unrelated_old_chunks(
    seed: int, old_size: int, new_size: int, blocks: list[int]
) -> None:
    """A stale or foreign old list costs speed, never a wrong cut."""
    old = SMALL.chunk_refs(content(seed, old_size, "random"))
    new_data = content(seed + 7, new_size, "repeated")
    assert fed_in_blocks(SMALL, old, new_data, blocks) == SMALL.chunk_refs(new_data)


def test_an_insert_in_a_big_file_cuts_only_around_it() -> None:
    data = random.Random(5).randbytes(8 << 20)
    old = BIG.chunk_refs(data)
    middle = len(data) // 2
    new_data = data[:middle] + b"x" * 100 + data[middle:]
    rechunker = Rechunker(BIG, old)
    blocks = [new_data[i : i + (1 << 20)] for i in range(0, len(new_data), 1 << 20)]
    got = [ref for block in blocks for ref in rechunker.feed(block)] + rechunker.finish()
    assert got == BIG.chunk_refs(new_data)
    # FastCDC ran over about one window around the edit, not the whole file.
    assert rechunker.cut_bytes <= 2 << 20


def test_a_changed_big_file_hashes_as_a_fresh_read(tmp_path: Path) -> None:
    """The scanner's path (store/filehash.py): a file over BLOCK_SIZE read with its previous
    chunk list gives the chunk list and root of a full read."""
    data = random.Random(9).randbytes(BLOCK_SIZE * 2 + 12345)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    before = hash_file_once(str(path), BIG, lambda _n: None, lambda _n: None)
    path.write_bytes(data[:5_000_000] + b"inserted" + data[5_000_000:-70_000])
    full = hash_file_once(str(path), BIG, lambda _n: None, lambda _n: None)
    again = hash_file_once(str(path), BIG, lambda _n: None, lambda _n: None, None, before.chunks)
    assert (again.chunks, again.root) == (full.chunks, full.root)
    assert again.root != before.root
