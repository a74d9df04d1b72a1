"""Temp files under a hostile local neighbour, and two fetches racing (issue 12, items 10, 11).

Checks: nothing is ever written through a planted symlink, hard link or swapped directory;
a second writer of the same temp file fails at once with a clear error; a file is never
committed unless every byte was verified into the temp file being committed; one path that
cannot be placed fails alone while the rest of its batch is placed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfs.content.chunking import ChunkRef, chunk_id
from p2pfs.errors import StorageError
from p2pfs.store.assemble import Finished, PartialFile, commit_files, partial_name

DATA = os.urandom(3000)
REF = ChunkRef(chunk_id(DATA), len(DATA))
ROOT = bytes(range(32))


def _partial(directory: Path, name: str = "f") -> PartialFile:
    return PartialFile(str(directory), name, ROOT, len(DATA))


def _temp(directory: Path, name: str = "f") -> Path:
    return directory / partial_name(name, ROOT)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(b"precious")
    return path


def test_planted_symlink_at_the_temp_name_is_never_followed(tmp_path: Path, victim: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    _temp(dest).symlink_to(victim)
    partial = _partial(dest)
    assert partial.verified_chunks([(0, REF)]) == set()
    partial.write_chunk(0, DATA, REF)
    partial.commit(executable=False)
    assert victim.read_bytes() == b"precious"
    assert (dest / "f").read_bytes() == DATA and not (dest / "f").is_symlink()


def test_planted_hard_link_and_fifo_are_replaced_not_used(tmp_path: Path, victim: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    os.link(victim, _temp(dest, "a"))
    os.mkfifo(_temp(dest, "b"))
    for name in ("a", "b"):
        partial = _partial(dest, name)
        partial.write_chunk(0, DATA, REF)  # a fifo would block an ordinary open forever
        partial.commit(executable=False)
        assert (dest / name).read_bytes() == DATA
    assert victim.read_bytes() == b"precious"


def test_directory_swapped_for_a_symlink_mid_fetch_is_refused(tmp_path: Path, victim: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    partial = _partial(dest)
    partial.write_chunk(0, DATA, REF)
    partial.close()
    os.rename(dest, tmp_path / "moved")
    dest.symlink_to(elsewhere)
    with pytest.raises(StorageError):
        partial.commit(executable=False)
    assert list(elsewhere.iterdir()) == []


def test_second_writer_of_one_temp_file_fails_clearly(tmp_path: Path) -> None:
    """Another process (another daemon) holding the temp file: we fail at once."""
    temp = _temp(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600);"
            " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            str(temp),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StorageError, match="another fetch is writing"):
            _partial(tmp_path).write_chunk(0, DATA, REF)
    finally:
        holder.communicate("")
    partial = _partial(tmp_path)
    partial.write_chunk(0, DATA, REF)
    partial.commit(executable=False)
    assert (tmp_path / "f").read_bytes() == DATA


def test_in_one_process_the_newer_fetch_takes_over(tmp_path: Path) -> None:
    """A fetch that failed may leave its PartialFile open (and locked): a retry in the same
    daemon takes the temp file over, and the old holder can no longer write or commit."""
    old = _partial(tmp_path)
    old.write_chunk(0, DATA, REF)  # holds the descriptor, so the lock
    new = _partial(tmp_path)
    assert new.verified_chunks([(0, REF)]) == {0}
    with pytest.raises(StorageError):
        old.write_chunk(0, DATA, REF)
    with pytest.raises(StorageError):
        old.commit(executable=False)
    new.commit(executable=False)
    assert (tmp_path / "f").read_bytes() == DATA


def test_the_reported_race_never_commits_zeros(tmp_path: Path) -> None:
    """Fetch A writes and commits; fetch B had verified A's temp file and commits after:
    B's temp file is gone (A renamed it), so B must fail, not create zeros and rename them."""
    a, b = _partial(tmp_path), _partial(tmp_path)
    a.write_chunk(0, DATA, REF)
    a.close()
    assert b.verified_chunks([(0, REF)]) == {0}
    b.close()
    a.commit(executable=False)
    with pytest.raises(StorageError):
        b.commit(executable=False)
    assert (tmp_path / "f").read_bytes() == DATA


def test_a_byte_never_verified_is_never_committed(tmp_path: Path) -> None:
    partial = PartialFile(str(tmp_path), "f", ROOT, len(DATA) + 10)
    partial.write_chunk(0, DATA, REF)
    with pytest.raises(StorageError, match="not every byte was verified"):
        partial.commit(executable=False)
    assert not (tmp_path / "f").exists()


def test_one_clash_fails_alone_and_the_batch_is_placed(tmp_path: Path) -> None:
    names = ["a", "b", "m", "y", "z"]
    items = []
    for name in names:
        partial = _partial(tmp_path, name)
        partial.write_chunk(0, DATA, REF)
        partial.close()
        items.append(Finished(partial, executable=False))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "inside").write_bytes(b"local")
    failed: dict[str, str] = {}
    placed = commit_files(
        items, on_error=lambda item, exc: failed.__setitem__(item.partial.final_name, str(exc))
    )
    assert sorted(item.partial.final_name for item in placed) == ["a", "b", "y", "z"]
    assert list(failed) == ["m"] and "is a directory" in failed["m"]
    assert (tmp_path / "m" / "inside").read_bytes() == b"local"
    assert all((tmp_path / name).read_bytes() == DATA for name in ("a", "b", "y", "z"))
    # Without on_error the old contract holds: the error is raised.
    again = _partial(tmp_path, "m")
    again.write_chunk(0, DATA, REF)
    with pytest.raises(StorageError, match="is a directory"):
        commit_files([Finished(again, executable=False)])
