"""Temp files of earlier attempts taken up by the next one (store/leftovers.py): on real
files, every chunk taken is verified, a donor of the same content is removed once it gave
all, a commit refused just before its rename keeps its whole temp file, and a full scan's
temp files that stayed untouched for a day are removed unless a download holds them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import Chunker, ChunkRef
from p2pfs.store.assemble import (
    Finished,
    PartialFile,
    commit_files,
    is_partial_name,
    partial_name,
)
from p2pfs.store.index import IndexStore
from p2pfs.store.leftovers import LEFTOVER_KEEP, remove_stale, take_leftovers
from p2pfs.store.scanner import scan_share
from tests.helpers_content import random_bytes

ROOT = bytes(range(32))
OTHER_ROOT = bytes(range(1, 33))
DATA = random_bytes(7, 3 << 20)


def chunks_of(data: bytes) -> list[tuple[int, ChunkRef]]:
    offset, out = 0, []
    for ref in Chunker().chunk_refs(data):
        out.append((offset, ref))
        offset += ref.length
    return out


LEAVES = chunks_of(DATA)


def temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if is_partial_name(name))


def half_written(directory: Path, name: str, written: set[int], torn: set[int]) -> None:
    """An earlier attempt's temp file for ``name``: the chunks at ``written`` offsets, of
    which those in ``torn`` have a flipped byte (a write cut short)."""
    partial = PartialFile(str(directory), name, ROOT, len(DATA))
    with partial:
        for offset, ref in LEAVES:
            if offset in written:
                partial.write_chunk(offset, DATA[offset : offset + ref.length], ref)
    if torn:
        with open(directory / partial_name(name, ROOT), "r+b") as handle:
            for offset in torn:
                handle.seek(offset)
                handle.write(bytes([DATA[offset] ^ 0xFF]))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_its_own_temp_file_gives_exactly_its_intact_chunks(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    directory = tmp_path_factory.mktemp("own")
    offsets = [offset for offset, _ref in LEAVES]
    written = set(data.draw(st.lists(st.sampled_from(offsets), unique=True)))
    torn: set[int] = set()
    if written:
        torn = set(data.draw(st.lists(st.sampled_from(sorted(written)), unique=True)))
    half_written(directory, "f.bin", written, torn)
    partial = PartialFile(str(directory), "f.bin", ROOT, len(DATA))
    with partial:
        held = take_leftovers({"f.bin": partial}, {"f.bin": LEAVES})
        assert held.get("f.bin", set()) == written - torn
        for offset, ref in LEAVES:
            if offset not in written - torn:
                partial.write_chunk(offset, DATA[offset : offset + ref.length], ref)
        assert partial.fully_verified()
    commit_files([Finished(partial, executable=False)])
    assert (directory / "f.bin").read_bytes() == DATA
    assert temp_files(directory) == []


def test_a_temp_file_of_the_same_content_under_another_name_is_copied_then_removed(
    tmp_path: Path,
) -> None:
    half_written(tmp_path, "f.bin", {offset for offset, _ref in LEAVES}, set())
    copy = PartialFile(str(tmp_path), "f.sync-conflict-1.bin", ROOT, len(DATA))
    with copy:
        held = take_leftovers({"copy": copy}, {"copy": LEAVES})
        assert held == {"copy": {offset for offset, _ref in LEAVES}}
        assert copy.fully_verified()
    commit_files([Finished(copy, executable=False)])
    assert (tmp_path / "f.sync-conflict-1.bin").read_bytes() == DATA
    assert temp_files(tmp_path) == []  # the donor gave everything: gone


def test_a_donor_that_gave_only_part_stays_and_other_content_is_never_taken(
    tmp_path: Path,
) -> None:
    first = LEAVES[0][0]
    half_written(tmp_path, "f.bin", {offset for offset, _ref in LEAVES}, {first})
    donor = partial_name("f.bin", ROOT)
    other = PartialFile(str(tmp_path), "g.bin", OTHER_ROOT, len(DATA))
    copy = PartialFile(str(tmp_path), "h.bin", ROOT, len(DATA))
    with other, copy:
        held = take_leftovers({"g": other, "h": copy}, {"g": LEAVES, "h": LEAVES})
        assert "g" not in held  # another root: not even looked at
        assert held["h"] == {offset for offset, _ref in LEAVES} - {first}
    assert donor in temp_files(tmp_path)


def test_a_donor_held_by_another_writer_is_copied_but_not_removed(tmp_path: Path) -> None:
    half_written(tmp_path, "f.bin", {offset for offset, _ref in LEAVES}, set())
    writer = PartialFile(str(tmp_path), "f.bin", ROOT, len(DATA))
    copy = PartialFile(str(tmp_path), "copy.bin", ROOT, len(DATA))
    with writer, copy:
        assert len(writer.verified_chunks(LEAVES)) == len(LEAVES)  # holds its lock
        held = take_leftovers({"copy": copy}, {"copy": LEAVES})
        assert len(held["copy"]) == len(LEAVES)
        assert partial_name("f.bin", ROOT) in temp_files(tmp_path)


def test_a_symlink_or_fifo_under_a_temp_name_gives_nothing(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(DATA)
    os.symlink(tmp_path / "secret", tmp_path / partial_name("a.bin", ROOT))
    os.mkfifo(tmp_path / partial_name("b.bin", ROOT))
    copy = PartialFile(str(tmp_path), "c.bin", ROOT, len(DATA))
    with copy:
        assert take_leftovers({"c": copy}, {"c": LEAVES}) == {}


def test_a_commit_refused_before_its_rename_keeps_its_temp_file_whole(tmp_path: Path) -> None:
    partial = PartialFile(str(tmp_path), "f.bin", ROOT, len(DATA))
    for offset, ref in LEAVES:
        partial.write_chunk(offset, DATA[offset : offset + ref.length], ref)
    assert commit_files([Finished(partial, executable=False)], lambda _item: False) == []
    assert not (tmp_path / "f.bin").exists()
    again = PartialFile(str(tmp_path), "f.bin", ROOT, len(DATA))
    with again:
        assert len(take_leftovers({"f": again}, {"f": LEAVES})["f"]) == len(LEAVES)


def test_a_full_scan_lists_temp_files_at_any_depth_and_never_shares_them(
    tmp_path: Path,
) -> None:
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "kept.txt").write_bytes(b"content")
    half_written(share / "sub", "f.bin", {LEAVES[0][0]}, set())
    with IndexStore(tmp_path / "index.sqlite3") as index:
        result = scan_share(share, index)
    assert result.files == 1
    assert result.leftovers == [str(share / "sub" / partial_name("f.bin", ROOT))]


def test_only_stale_temp_files_no_one_holds_are_removed(tmp_path: Path) -> None:
    for name in ("old.bin", "held.bin"):
        half_written(tmp_path, name, {LEAVES[0][0]}, set())
    (tmp_path / "plain.bin").write_bytes(b"not a temp file")
    os.symlink(tmp_path / "plain.bin", tmp_path / partial_name("link.bin", ROOT))
    paths = [str(tmp_path / name) for name in os.listdir(tmp_path)]
    held = PartialFile(str(tmp_path), "held.bin", ROOT, len(DATA))
    with held:
        held.verified_chunks(LEAVES)  # a download in progress holds its temp file's lock
        # Untouched for less than a day: kept.
        assert remove_stale(paths, now=time.time()) == []
        later = time.time() + LEFTOVER_KEEP + 60
        assert remove_stale(paths, now=later) == [str(tmp_path / partial_name("old.bin", ROOT))]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [partial_name("held.bin", ROOT), partial_name("link.bin", ROOT), "plain.bin"]
    )
