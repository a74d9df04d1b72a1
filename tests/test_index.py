"""The SQLite index: migrations, persistence, chunk locations, the metadata budget."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import astuple
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker
from p2pfs.content.folder import FILE_TREE
from p2pfs.content.tree import Child, iter_leaves
from p2pfs.errors import IntegrityError, StorageError
from p2pfs.store.filehash import SETTLED_COARSE_NS, SETTLED_FINE_NS, settled_ctime
from p2pfs.store.folders import FolderStore
from p2pfs.store.index import (
    LOCATE_BATCH,
    SCHEMA_VERSION,
    ChunkReader,
    IndexStore,
    read_chunk,
    unpack_chunks,
)
from p2pfs.store.scanner import scan_share


def test_migrations_record_version(tmp_path: Path) -> None:
    with IndexStore(tmp_path / "index.sqlite3") as index:
        assert index.schema_version() == SCHEMA_VERSION >= 1
    conn = sqlite3.connect(tmp_path / "index.sqlite3")
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    assert {"schema_version", "shares", "files", "chunk_locations", "dir_nodes"} <= tables
    assert mode == "wal"


def test_reopen_keeps_data(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "a.txt").write_bytes(b"hello")
    with IndexStore(tmp_path / "index.sqlite3") as index:
        first = scan_share(tmp_path / "share", index)
    with IndexStore(tmp_path / "index.sqlite3") as index:
        assert index.schema_version() == SCHEMA_VERSION
        share = index.share_by_root(first.root)
        assert share is not None and share.manifest == first.manifest.encode()
        assert [record.path for record in index.share_files(share.id)] == ["a.txt"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    with IndexStore(tmp_path / "index.sqlite3"):
        pass
    conn = sqlite3.connect(tmp_path / "index.sqlite3")
    with conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        IndexStore(tmp_path / "index.sqlite3")


def test_corrupt_database_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "index.sqlite3").write_bytes(b"this is not a database" * 200)
    with pytest.raises(StorageError):
        IndexStore(tmp_path / "index.sqlite3")


def test_chunk_location_lookup_returns_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "blob").write_bytes(data)
    with IndexStore(tmp_path / "index.sqlite3") as index:
        result = scan_share(tmp_path / "share", index)
        records = list(index.share_files(result.share_id))
        refs = records[0].chunk_refs()
        assert refs == Chunker(DEFAULT_CHUNKER).chunk_refs(data)
        offset = 0
        for ref in refs:
            (location,) = index.locate_chunk(ref.id)
            assert (location.offset, location.length) == (offset, ref.length)
            assert read_chunk(location, ref.id) == data[offset : offset + ref.length]
            assert index.locate_chunk(ref.id, share_root=result.root) == [location]
            assert index.locate_chunk(ref.id, share_root=bytes(32)) == []
            offset += ref.length
        assert index.locate_chunk(b"\x00" * 32) == []


def test_locate_chunks_answers_as_locate_chunk_does(tmp_path: Path) -> None:
    """The batched lookup (one query per LOCATE_BATCH ids) gives each id the locations
    locate_chunk gives it: repeated ids, unknown ids, a share filter, many batches."""
    share = tmp_path / "share"
    share.mkdir()
    blobs = [os.urandom(1000 + number) for number in range(5)]
    for number, blob in enumerate(blobs):
        (share / f"f{number}").write_bytes(blob)
    (share / "copy").write_bytes(blobs[0])  # one chunk in two files
    with IndexStore(tmp_path / "index.sqlite3") as index:
        result = scan_share(share, index)
        known = [Chunker(DEFAULT_CHUNKER).chunk_refs(blob)[0].id for blob in blobs]
        unknown = [number.to_bytes(32, "big") for number in range(LOCATE_BATCH + 7)]
        cids = [known[0], *unknown[:3], known[1], known[0], *unknown[3:], *known[2:]]
        for root in (None, result.root, bytes(32)):
            got = index.locate_chunks(cids, root)
            assert len(got) == len(cids)
            for cid, locations in zip(cids, got, strict=True):
                expected = index.locate_chunk(cid, root)
                assert sorted(map(astuple, locations)) == sorted(map(astuple, expected))
        assert len(index.locate_chunks([known[0]])[0]) == 2
        assert index.locate_chunks([]) == []


def test_file_tree_is_rebuilt_from_the_chunk_list(tmp_path: Path) -> None:
    data = os.urandom(6 << 20)
    (tmp_path / "f").write_bytes(data)
    with IndexStore(tmp_path / "index.sqlite3") as index:
        result = scan_share(tmp_path / "f", index)
        (record,) = index.share_files(result.share_id)
        nodes = index.file_tree_nodes(record.root)
        assert nodes is not None
        tree = Child(record.root, len(data))
        leaves = [leaf for _, leaf in iter_leaves(FILE_TREE, tree, nodes.__getitem__)]
        assert leaves == unpack_chunks(record.chunks)


def test_file_trees_many_answers_as_file_tree_nodes_within_a_share(tmp_path: Path) -> None:
    """The batched read gives each root the tree file_tree_nodes gives it; unknown roots
    (one sharing a known root's 8-byte prefix) are left out, and with a share path only
    that share's files count."""
    shares = [tmp_path / "one", tmp_path / "two"]
    roots: list[list[bytes]] = []
    with IndexStore(tmp_path / "index.sqlite3") as index:
        for number, share in enumerate(shares):
            share.mkdir()
            for file in range(3):
                (share / f"f{file}").write_bytes(os.urandom(500 + 700 * file + number))
            result = scan_share(share, index)
            roots.append([record.root for record in index.share_files(result.share_id)])
        known = roots[0] + roots[1]
        twin = known[0][:8] + bytes(24)
        unknown = [twin, *(number.to_bytes(32, "big") for number in range(LOCATE_BATCH + 3))]
        wanted = [*unknown[:2], *known, known[0], *unknown[2:]]
        assert index.file_trees_many(wanted) == {
            root: index.file_tree_nodes(root) for root in known
        }
        scoped = index.file_trees_many(wanted, os.path.realpath(shares[1]))
        assert scoped == {root: index.file_tree_nodes(root) for root in roots[1]}
        assert index.file_trees_many([], str(shares[0])) == {}


@pytest.mark.slow
def test_metadata_budget(tmp_path: Path) -> None:
    """<= 1 MiB of index per GiB described: 0.1% of a big random file."""
    size = 128 << 20
    with open(tmp_path / "big", "wb") as out:
        for _ in range(size >> 22):
            out.write(os.urandom(4 << 20))
    with IndexStore(tmp_path / "index.sqlite3") as index:
        index.checkpoint()
        empty = index.size_bytes()  # one page per table and index, whatever the data
        result = scan_share(tmp_path / "big", index)
        index.checkpoint()
        used = index.size_bytes() - empty
    assert result.bytes == size
    assert used / size <= 0.001, f"{used} bytes of index for {size} bytes"
    assert used / result.chunks <= 75, f"{used / result.chunks:.1f} bytes a chunk"


def test_folder_members_not_met_since_a_cutoff_are_forgotten(tmp_path: Path) -> None:
    """Only authenticated member addresses are stored; old ones expire (issue 12 item 4)."""
    with IndexStore(tmp_path / "index.sqlite3") as index:
        store = FolderStore(index)
        row = store.add_folder(
            b"f" * 32, str(tmp_path / "dir"), b"r" * 32, b"w" * 32, None, b"d" * 32, 1
        )
        store.put_peer(row.id, b"old" * 8, "192.0.2.1", 7337, 1_000)
        store.put_peer(row.id, b"new" * 8, "192.0.2.2", 7337, 5_000)
        assert store.forget_peers_before(row.id, 2_000) == 1
        assert [peer.node_id for peer in store.peers(row.id)] == [b"new" * 8]


@given(
    ctime_ns=st.integers(0, 1 << 62),
    mtime_ns=st.integers(0, 1 << 62),
    read_started_ns=st.integers(0, 1 << 62),
    later_ns=st.integers(0, 1 << 40),
)
def test_a_settled_ctime_is_older_than_the_read_by_more_than_a_tick(
    ctime_ns: int, mtime_ns: int, read_started_ns: int, later_ns: int
) -> None:
    """Settled: both times older than the read by more than a tick (50 ms where both have
    a sub-second part, else 2 s); a later read never unsettles what an earlier one
    settled."""
    settled = settled_ctime(ctime_ns, mtime_ns, read_started_ns)
    fine = ctime_ns % 10**9 != 0 and mtime_ns % 10**9 != 0
    tick = SETTLED_FINE_NS if fine else SETTLED_COARSE_NS
    if max(ctime_ns, mtime_ns) < read_started_ns - tick:
        assert settled == ctime_ns
    else:
        assert settled is None
    if settled is not None:
        assert settled_ctime(ctime_ns, mtime_ns, read_started_ns + later_ns) == ctime_ns


def _settled_share(tmp_path: Path, data: bytes) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    (share / "blob").write_bytes(data)
    # Older than a timestamp tick before the scan reads it: its ctime is then settled.
    time.sleep(2 * SETTLED_FINE_NS / 1e9)
    return share


def test_a_server_trusts_a_settled_file_until_its_stat_moves(tmp_path: Path) -> None:
    """A scan records a settled file's ctime; while the file's stat still shows it, a
    server's reader sends its chunks without hashing them (shown with a wrong id, which
    only a hash would catch), a local reader still hashes. An in-place edit of the same
    size with the mtime put back moves the ctime: the server's reader hashes again and
    refuses the changed bytes."""
    data = os.urandom(3 << 20)
    share = _settled_share(tmp_path, data)
    with IndexStore(tmp_path / "index.sqlite3") as index:
        scan_share(share, index)
        (record,) = index.share_files(index.share_id_at(str(share.resolve())) or 0)
        refs = record.chunk_refs()
        first = refs[0]
        (location,) = index.locate_chunks([first.id])[0]
    st = (share / "blob").stat()
    assert location.settled == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    wrong = bytes(32)
    with ChunkReader(trust_settled=True) as server:
        assert server.read(location, wrong) == data[: first.length]
        assert server.read(location, first.id) == data[: first.length]
    with ChunkReader() as local, pytest.raises(IntegrityError):
        local.read(location, wrong)
    time.sleep(2 * SETTLED_FINE_NS / 1e9)  # the edit's ctime lands in a later tick
    with open(share / "blob", "r+b") as handle:
        handle.write(b"\xff" * 16)
    os.utime(share / "blob", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (share / "blob").stat().st_mtime_ns == st.st_mtime_ns
    with ChunkReader(trust_settled=True) as server, pytest.raises(IntegrityError):
        server.read(location, first.id)


def test_a_file_whose_times_are_not_settled_is_hashed_when_served(tmp_path: Path) -> None:
    """A file whose mtime is not older than its scan by a tick (here: in the future, as an
    archive or a skewed clock leaves it) gets no settled ctime, unlike a settled one
    beside it: its chunks are hashed whenever they are served."""
    share = _settled_share(tmp_path, os.urandom(200_000))
    ahead = time.time_ns() + 60 * 10**9
    (share / "ahead").write_bytes(os.urandom(100_000))
    os.utime(share / "ahead", ns=(ahead, ahead))
    with IndexStore(tmp_path / "index.sqlite3") as index:
        scan_share(share, index)
        share_id = index.share_id_at(str(share.resolve()))
        assert share_id is not None
        settled = {}
        for record in index.share_files(share_id):
            (found,) = index.locate_chunks([record.chunk_refs()[0].id])
            settled[record.path] = found[0].settled is not None
    assert settled == {"blob": True, "ahead": False}
