from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from p2pfs.content.chunking import Chunker, ChunkRef
from p2pfs.errors import IntegrityError, StorageError
from p2pfs.store import assemble
from p2pfs.store.assemble import Finished, PartialFile, commit_files, is_partial_name, umask
from p2pfs.store.directories import SharedDirectories
from tests.helpers_content import random_bytes

ROOT = bytes(range(32))


def chunks_of(data: bytes) -> list[tuple[int, ChunkRef]]:
    offset = 0
    out = []
    for ref in Chunker().chunk_refs(data):
        out.append((offset, ref))
        offset += ref.length
    return out


def test_destination_appears_only_on_commit(tmp_path: Path) -> None:
    data = random_bytes(1, 1 << 20)
    (tmp_path / "f.bin").write_bytes(b"old content")
    with PartialFile(str(tmp_path), "f.bin", ROOT, len(data)) as partial:
        for offset, ref in reversed(chunks_of(data)):  # any order
            partial.write_chunk(offset, data[offset : offset + ref.length], ref)
            assert (tmp_path / "f.bin").read_bytes() == b"old content"
        partial.commit(executable=True, mtime_ns=1_600_000_000_000_000_000)
    assert (tmp_path / "f.bin").read_bytes() == data
    info = os.stat(tmp_path / "f.bin")
    assert info.st_mode & stat.S_IXUSR
    assert info.st_mtime_ns == 1_600_000_000_000_000_000
    assert not [p for p in os.listdir(tmp_path) if is_partial_name(p)]


def test_unverified_bytes_are_never_written(tmp_path: Path) -> None:
    data = random_bytes(2, 300_000)
    (offset, ref), *_ = chunks_of(data)
    with PartialFile(str(tmp_path), "f", ROOT, len(data)) as partial:
        bad = bytearray(data[: ref.length])
        bad[5] ^= 1
        with pytest.raises(IntegrityError):
            partial.write_chunk(offset, bytes(bad), ref)
        # Nothing was written, not even an empty temp file.
        assert not Path(partial.temp_path).exists()


def test_resume_finds_intact_chunks_and_rejects_torn_ones(tmp_path: Path) -> None:
    data = random_bytes(3, 2 << 20)
    chunks = chunks_of(data)
    with PartialFile(str(tmp_path), "f", ROOT, len(data)) as partial:
        for offset, ref in chunks[::2]:
            partial.write_chunk(offset, data[offset : offset + ref.length], ref)
        temp_path = partial.temp_path
    # A crash mid-write: one written chunk is torn.
    torn_offset, _torn = chunks[2]
    fd = os.open(temp_path, os.O_WRONLY)
    os.pwrite(fd, b"\xff" * 10, torn_offset + 7)
    os.close(fd)
    with PartialFile(str(tmp_path), "f", ROOT, len(data)) as resumed:
        present = resumed.verified_chunks(chunks)
        assert present == {offset for offset, _ in chunks[::2]} - {torn_offset}
        for offset, ref in chunks:
            if offset not in present:
                resumed.write_chunk(offset, data[offset : offset + ref.length], ref)
        resumed.commit(executable=False)
    assert (tmp_path / "f").read_bytes() == data


def test_never_replaces_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with PartialFile(str(tmp_path), "d", ROOT, 0) as partial, pytest.raises(StorageError):
        partial.commit(executable=False)
    assert (tmp_path / "d").is_dir()


def test_empty_file(tmp_path: Path) -> None:
    with PartialFile(str(tmp_path), "empty", ROOT, 0) as partial:
        partial.commit(executable=False)
    assert (tmp_path / "empty").read_bytes() == b""


def test_batch_commit_makes_many_files_appear(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    finished = []
    contents = {}
    for number in range(50):
        directory = tmp_path / ("sub" if number % 2 else "")
        data = random_bytes(number, number * 100)
        partial = PartialFile(str(directory), f"f{number}", ROOT, len(data))
        for offset, ref in chunks_of(data):
            partial.write_chunk(offset, data[offset : offset + ref.length], ref)
        partial.close()
        finished.append(Finished(partial, executable=number % 3 == 0))
        contents[directory / f"f{number}"] = (data, number % 3 == 0)
        assert not (directory / f"f{number}").exists()
    commit_files(finished)
    for path, (data, executable) in contents.items():
        assert path.read_bytes() == data
        assert bool(os.stat(path).st_mode & stat.S_IXUSR) == executable
    assert not [p for p in tmp_path.rglob("*") if is_partial_name(p.name)]


def test_threads_writing_one_new_file_at_once_share_its_descriptor(tmp_path: Path) -> None:
    """A fetch writes batches in several worker threads; two may hold chunks of one file
    that is not open yet. Each must write through the one locked descriptor: the second
    used to fail on the first's lock and close the descriptor the first was writing with."""
    import threading  # noqa: PLC0415

    files = 40
    writers = 4
    piece = 4096
    failures: list[StorageError] = []
    done: list[tuple[Finished, bytes]] = []
    for number in range(files):
        data = random_bytes(number, writers * piece)
        partial = PartialFile(str(tmp_path), f"f{number}", bytes([number]) * 32, len(data))
        start = threading.Barrier(writers)

        def write(
            part: int,
            partial: PartialFile = partial,
            data: bytes = data,
            start: threading.Barrier = start,
        ) -> None:
            start.wait()
            try:
                offset = part * piece
                partial.write_verified(offset, data[offset : offset + piece])
            except StorageError as exc:  # what the race raised
                failures.append(exc)

        threads = [threading.Thread(target=write, args=(part,)) for part in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[0]
        assert partial.fully_verified()
        done.append((Finished(partial, executable=False), data))
    commit_files([finished for finished, _data in done])  # one sync for all
    for number, (_finished, data) in enumerate(done):
        assert (tmp_path / f"f{number}").read_bytes() == data


def test_chunks_copied_from_another_file_count_only_where_they_verify(tmp_path: Path) -> None:
    """copy_chunks (a sync member's unchanged runs, copied from the file's previous
    version): a chunk whose source bytes changed since they were indexed stays unverified,
    so the file cannot be committed until it is written again from verified bytes."""
    data = random_bytes(7, 1 << 20)
    leaves = chunks_of(data)
    assert len(leaves) >= 3
    source = tmp_path / "old.bin"
    changed = bytearray(data)
    second_offset, second = leaves[1]
    changed[second_offset + 10] ^= 1  # the source lost one chunk's bytes
    source.write_bytes(bytes(changed))
    fd = os.open(source, os.O_RDONLY)
    try:
        with PartialFile(str(tmp_path), "f.bin", ROOT, len(data)) as partial:
            done = partial.copy_chunks(fd, 0, 0, [ref for _offset, ref in leaves])
            assert done == {offset for offset, _ref in leaves} - {second_offset}
            with pytest.raises(StorageError):
                partial.commit(executable=False)
    finally:
        os.close(fd)
    assert not (tmp_path / "f.bin").exists()
    with PartialFile(str(tmp_path), "f.bin", ROOT, len(data)) as partial:
        fd = os.open(source, os.O_RDONLY)
        try:
            partial.copy_chunks(fd, 0, 0, [ref for _offset, ref in leaves])
        finally:
            os.close(fd)
        piece = data[second_offset : second_offset + second.length]
        partial.write_chunk(second_offset, piece, second)
        partial.commit(executable=False)
    assert (tmp_path / "f.bin").read_bytes() == data


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("shift", [0, 100, 4095])
def test_a_long_run_copied_from_an_old_version_lands_verified_at_any_alignment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: int, direct: bool
) -> None:
    """copy_chunks of a run longer than a copy block, landing ``shift`` bytes after where
    the source has it (an insert before it): page-aligned stretches go with O_DIRECT
    (``direct``; else all through the page cache), the edges through the cache; a chunk
    whose source bytes changed is not written. With that chunk and the inserted bytes
    written from verified bytes, the file is the new content."""
    monkeypatch.setattr(assemble, "_DIRECT", direct)
    data = random_bytes(8, 2 * assemble.COPY_BLOCK + 12345)
    leaves = chunks_of(data)
    inserted = random_bytes(9, shift)
    new = inserted + data
    bad_offset, bad = leaves[len(leaves) // 2]
    source = bytearray(data)
    source[bad_offset + bad.length - 1] ^= 1  # its last byte, next to a good chunk's first
    (tmp_path / "old.bin").write_bytes(bytes(source))
    fd = os.open(tmp_path / "old.bin", os.O_RDONLY)
    try:
        with PartialFile(str(tmp_path), "f.bin", ROOT, len(new)) as partial:
            done = partial.copy_chunks(fd, 0, shift, [ref for _offset, ref in leaves])
            assert done == {shift + offset for offset, _ref in leaves} - {shift + bad_offset}
            temp = tmp_path / partial.temp_name
            written = temp.read_bytes()
            assert written[shift + bad_offset : shift + bad_offset + bad.length] == bytes(
                bad.length
            )  # never written: still the hole the temp file was sized with
            if shift:
                partial.write_chunk(0, inserted, Chunker().chunk_refs(inserted)[0])
            assert not partial.fully_verified()  # the changed chunk is still missing
            piece = data[bad_offset : bad_offset + bad.length]
            partial.write_chunk(shift + bad_offset, piece, bad)
            partial.commit(executable=False)
    finally:
        os.close(fd)
    assert (tmp_path / "f.bin").read_bytes() == new


def test_a_new_file_written_whole_is_placed_with_its_metadata_in_a_batch(tmp_path: Path) -> None:
    """write_new (a small file whose every chunk is in hand): created, written and given
    its mode and mtime in one step; it appears only when the batch commits, and a file
    whose commit asks for other metadata gets that instead (the general path)."""
    finished = []
    contents = {}
    for number in range(6):
        data = random_bytes(100 + number, 1000 + number * 5000)
        partial = PartialFile(str(tmp_path), f"f{number}", ROOT, len(data))
        assert partial.untouched
        parts = [(offset, data[offset : offset + ref.length]) for offset, ref in chunks_of(data)]
        assert partial.write_new(parts, executable=number == 1, mtime_ns=1_500_000_000 * 10**9)
        assert not partial.untouched
        assert not (tmp_path / f"f{number}").exists()
        # f2's commit names another mtime than it was written with: that one is applied.
        mtime = 1_700_000_000 * 10**9 if number == 2 else 1_500_000_000 * 10**9
        finished.append(Finished(partial, executable=number == 1, mtime_ns=mtime))
        contents[tmp_path / f"f{number}"] = (data, mtime, number == 1)
    assert len(commit_files(finished)) == 6
    for path, (data, mtime, executable) in contents.items():
        info = os.stat(path)
        assert path.read_bytes() == data
        assert info.st_mtime_ns == mtime
        assert stat.S_IMODE(info.st_mode) == (0o755 if executable else 0o644) & ~umask()
    assert not [p for p in os.listdir(tmp_path) if is_partial_name(p)]


def test_final_state_is_read_in_the_directory_the_file_is_placed_into(tmp_path: Path) -> None:
    """What a commit compares against the scan: read through the directory descriptor the
    file holds, so a path whose directory was swapped for a symlink since is not followed."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"old")
    partial = PartialFile(str(tmp_path / "d"), "f", ROOT, 3)
    with partial:
        held = partial.final_state()
        assert held is not None and held.st_size == 3
        assert held.st_ino == os.lstat(tmp_path / "d" / "f").st_ino
        os.rename(tmp_path / "d", tmp_path / "moved")
        (tmp_path / "elsewhere").mkdir()
        os.symlink(tmp_path / "elsewhere", tmp_path / "d")
        again = partial.final_state()
        assert again is not None and again.st_ino == held.st_ino  # the directory it holds
        os.unlink(tmp_path / "moved" / "f")
        assert partial.final_state() is None


def test_write_new_leaves_an_existing_temp_file_to_the_resuming_path(tmp_path: Path) -> None:
    data = random_bytes(7, 200_000)
    chunks = chunks_of(data)
    parts = [(offset, data[offset : offset + ref.length]) for offset, ref in chunks]
    with PartialFile(str(tmp_path), "f", ROOT, len(data)) as first:
        first.write_verified(*parts[0])
    resumed = PartialFile(str(tmp_path), "f", ROOT, len(data))
    assert not resumed.write_new(parts, executable=False)  # nothing done: a temp file is there
    assert resumed.verified_chunks(chunks) == {chunks[0][0]}
    for offset, piece in parts[1:]:
        resumed.write_verified(offset, piece)
    resumed.commit(executable=False)
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.parametrize("whole", [True, False])
def test_a_temp_file_replaced_behind_a_closed_writer_is_never_placed(
    tmp_path: Path, whole: bool
) -> None:
    """The temp file is removed and a right-sized file of zeros planted under its name
    while ours is closed (or still open, for a file written whole): ext4 hands the freed
    inode number out again at once, so the number alone matched and the zeros were
    committed as the file. The inode's generation tells them apart."""
    data = random_bytes(8, 30_000)
    parts = [(offset, data[offset : offset + ref.length]) for offset, ref in chunks_of(data)]
    writer = PartialFile(str(tmp_path), "f", ROOT, len(data))
    if whole:
        assert writer.write_new(parts, executable=False)
    else:
        for offset, piece in parts:
            writer.write_verified(offset, piece)
        writer.close()
    os.unlink(writer.temp_path)
    Path(writer.temp_path).write_bytes(b"\0" * len(data))  # same size, never verified
    failures: list[str] = []
    placed = commit_files(
        [Finished(writer, executable=False), Finished(writer, executable=False)],
        on_error=lambda _item, exc: failures.append(str(exc)),
    )
    assert placed == [] and failures and "replaced" in failures[0]
    assert not (tmp_path / "f").exists()


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _write_whole(
    directory: Path, name: str, data: bytes, directories: SharedDirectories
) -> PartialFile:
    partial = PartialFile(str(directory), name, ROOT, len(data), directories=directories)
    parts = [(offset, data[offset : offset + ref.length]) for offset, ref in chunks_of(data)]
    assert partial.write_new(parts, executable=False)
    return partial


def test_a_batch_opens_one_descriptor_per_directory_and_closes_it_after(tmp_path: Path) -> None:
    directories = SharedDirectories()
    before = _open_descriptors()
    finished = []
    contents = {}
    for number in range(12):
        directory = tmp_path / f"d{number % 3}"
        directory.mkdir(exist_ok=True)
        data = random_bytes(200 + number, 3000 + number)
        finished.append(Finished(_write_whole(directory, f"f{number}", data, directories), False))
        contents[directory / f"f{number}"] = data
    assert directories.open_count() == 3
    assert _open_descriptors() == before + 3 + 12  # three directories, twelve temp files
    assert len(commit_files(finished)) == 12
    assert directories.open_count() == 0
    assert _open_descriptors() == before
    assert all(path.read_bytes() == data for path, data in contents.items())


def test_a_directory_swapped_for_a_symlink_between_two_files_of_a_batch_is_not_followed(
    tmp_path: Path,
) -> None:
    """The batch's descriptor names the directory it opened: a file started after the
    swap is written and placed there too, never through the symlink; once the batch has
    let the descriptor go, the path is opened again and the symlink refused."""
    dest, moved, elsewhere = tmp_path / "dest", tmp_path / "moved", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    directories = SharedDirectories()
    first = _write_whole(dest, "a", b"first file", directories)
    os.rename(dest, moved)
    dest.symlink_to(elsewhere)
    second = _write_whole(dest, "b", b"second file", directories)
    chunked = PartialFile(str(dest), "c", ROOT, 10, directories=directories)
    chunked.write_verified(0, b"third file")
    chunked.close()  # the batch still holds the directory: c's commit uses it again
    placed = commit_files([Finished(p, executable=False) for p in (first, second, chunked)])
    assert len(placed) == 3
    assert list(elsewhere.iterdir()) == []
    assert (moved / "a").read_bytes() == b"first file"
    assert (moved / "b").read_bytes() == b"second file"
    assert (moved / "c").read_bytes() == b"third file"
    assert directories.open_count() == 0
    late = PartialFile(str(dest), "d", ROOT, 4, directories=directories)
    with pytest.raises(StorageError, match="cannot open directory"):
        late.write_verified(0, b"late")
    assert list(elsewhere.iterdir()) == [] and directories.open_count() == 0


def test_a_taken_over_file_leaves_the_batch_directory_to_the_others(tmp_path: Path) -> None:
    """A newer PartialFile of this process takes a temp file over from an older one of the
    same batch: the older can neither commit nor remove it, and the batch's directory
    descriptor stays good for the rest."""
    directories = SharedDirectories()
    data = random_bytes(300, 5000)
    chunks = chunks_of(data)
    parts = [(offset, data[offset : offset + ref.length]) for offset, ref in chunks]
    old = PartialFile(str(tmp_path), "f", ROOT, len(data), directories=directories)
    for offset, piece in parts:
        old.write_verified(offset, piece)  # keeps its descriptor (and lock)
    other = _write_whole(tmp_path, "g", b"another file", directories)
    new = PartialFile(str(tmp_path), "f", ROOT, len(data), directories=directories)
    assert new.verified_chunks(chunks) == {offset for offset, _ref in chunks}
    with pytest.raises(StorageError):
        old.commit(executable=False)
    old.discard()
    assert Path(new.temp_path).exists()
    assert len(commit_files([Finished(new, False), Finished(other, False)])) == 2
    assert (tmp_path / "f").read_bytes() == data
    assert (tmp_path / "g").read_bytes() == b"another file"
    assert directories.open_count() == 0
