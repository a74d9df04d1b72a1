"""The file-system steps of applying folder changes (real directories, no daemon)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from p2pfs.daemon.folders import steps
from p2pfs.errors import StorageError
from p2pfs.store import folderdisk as disk
from p2pfs.store.assemble import partial_name
from p2pfs.sync.ignore import IGNORE_FILE


def test_ignore_file_is_read_into_gitignore_rules_that_always_skip_state(
    tmp_path: Path,
) -> None:
    ignore_file = disk.IgnoreFile(str(tmp_path))
    rules = ignore_file.load()
    assert not rules("notes.txt")
    assert rules(".p2pfs/versions/a~20260101-000000.txt")
    assert rules("sub/" + partial_name("notes.txt", bytes(32)))  # assembly's temp files
    (tmp_path / IGNORE_FILE).write_text("*.log\nbuild/\n!keep.log\n/top-only\n")
    rules = ignore_file.load()
    assert rules("a.log") and rules("deep/dir/b.log")
    assert not rules("keep.log")
    assert rules("build", is_directory=True) and rules("build/out/x.o")
    assert rules("top-only") and not rules("sub/top-only")
    assert not rules(IGNORE_FILE)  # the patterns themselves are synced
    assert ignore_file.load() is rules  # unchanged file: not read again
    (tmp_path / IGNORE_FILE).unlink()
    assert not ignore_file.load()("a.log")


def test_make_parents_never_goes_through_a_symlink(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    outside = tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "link").symlink_to(outside)
    with pytest.raises(StorageError):
        disk.make_parents(str(folder), "link/escape.txt")
    assert disk.make_parents(str(folder), "a/b/c.txt") == str(folder / "a" / "b")
    (folder / "file").write_text("x")
    with pytest.raises(StorageError):
        disk.make_parents(str(folder), "file/child.txt")
    assert list(outside.iterdir()) == []


def test_kept_versions_hold_the_old_content_and_expire(tmp_path: Path) -> None:
    folder = str(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "report.txt").write_text("first")
    kept = disk.keep_version(folder, "d/report.txt", move=False)
    assert kept is not None and kept.startswith(".p2pfs/versions/d/report~")
    assert kept.endswith(".txt")
    # The engine replaces a file by renaming a new one over it: the kept link keeps the old.
    (tmp_path / "new.tmp").write_text("second")
    os.replace(tmp_path / "new.tmp", tmp_path / "d" / "report.txt")
    again = disk.keep_version(folder, "d/report.txt", move=True)
    assert again is not None and again != kept
    assert not (tmp_path / "d" / "report.txt").exists()
    assert {(tmp_path / kept).read_text(), (tmp_path / again).read_text()} == {
        "first",
        "second",
    }
    assert disk.expire_versions(folder, keep_seconds=3600) == 0
    assert disk.expire_versions(folder, keep_seconds=3600, now=time.time() + 7200) == 2
    assert not (tmp_path / ".p2pfs" / "versions" / "d").exists()


def test_link_within_never_replaces(tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("src")
    (tmp_path / "taken.txt").write_text("taken")
    assert not disk.link_within(str(tmp_path), "src.txt", "taken.txt")
    assert (tmp_path / "taken.txt").read_text() == "taken"
    assert disk.link_within(str(tmp_path), "src.txt", "copy/src.txt")
    assert os.path.samefile(tmp_path / "src.txt", tmp_path / "copy" / "src.txt")


def test_state_of_tells_files_from_everything_else(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("12345")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "f")
    state = disk.state_of(str(tmp_path), "f")
    assert state is not None and state.size == 5
    assert disk.state_of(str(tmp_path), "missing") is None
    for other in ("d", "l"):
        seen = disk.state_of(str(tmp_path), other)
        assert seen is not None and seen.size == -1  # never equal to a scanned file


def test_problem_paths_cover_everything_below_an_unreadable_directory(tmp_path: Path) -> None:
    top = os.path.realpath(tmp_path)
    unreadable = disk.problem_paths(
        str(tmp_path), [f"{top}/locked", f"{top}/x/file.txt", "/elsewhere/y"]
    )
    assert unreadable("locked") and unreadable("locked/deep/f")
    assert unreadable("x/file.txt") and not unreadable("x/other.txt")
    assert not unreadable("lockedness")


def test_directories_are_made_and_removed_only_when_real_and_empty(tmp_path: Path) -> None:
    folder = str(tmp_path)
    disk.make_directory(folder, "a/b/c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    (tmp_path / "a" / "b" / "keep.txt").write_text("x")
    assert disk.remove_directory(folder, "a/b/c")
    assert not disk.remove_directory(folder, "a/b")  # not empty: stays
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    (outside / "victim").mkdir(parents=True)
    (tmp_path / "link").symlink_to(outside)
    assert not disk.remove_directory(folder, "link/victim")  # never through a symlink
    assert (outside / "victim").is_dir()


def test_a_deleted_tree_whose_rest_comes_later_leaves_no_directory_behind(tmp_path: Path) -> None:
    """A member's rmtree can reach another member as two batches of deletes. A directory
    that still holds a file when its delete is applied is not done (its delete is not
    recorded, and planned again); once the rest is deleted, every directory goes. Counted
    done at once, the emptied directories stayed behind with their deletes recorded, and
    the next full scan sent them back to the member that deleted them."""
    folder = str(tmp_path)
    for name in ("src/lib/mod.py", "src/lib/deeper/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    scanned = {
        name: disk.state_of(folder, name) for name in ("src/lib/mod.py", "src/lib/deeper/x.txt")
    }
    tree = {"src", "src/lib", "src/lib/deeper"}
    first = steps.delete_paths(folder, scanned, ["src/lib/mod.py", *sorted(tree)], tree)
    assert first == {"src/lib/mod.py"}
    assert (tmp_path / "src" / "lib" / "deeper" / "x.txt").exists()
    second = steps.delete_paths(folder, scanned, ["src/lib/deeper/x.txt", *sorted(tree)], tree)
    assert second == {"src/lib/deeper/x.txt", *tree}
    assert not (tmp_path / "src").exists()
    # Nothing left to remove is done: a directory gone already, one behind a symlink
    # (never reached through), a file where the directory was.
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    (outside / "victim").mkdir(parents=True)
    (tmp_path / "link").symlink_to(outside)
    (tmp_path / "now-a-file").write_text("x")
    odd = {"gone", "link/victim", "now-a-file"}
    assert steps.delete_paths(folder, {}, sorted(odd), odd) == odd
    assert (outside / "victim").is_dir() and (tmp_path / "now-a-file").is_file()


def test_a_version_stamp_is_the_second_it_was_kept_never_rounded_up() -> None:
    # Found by hypothesis (test_hostile_storage_names): fromtimestamp rounded 1.9999995 to 2.
    kept = disk.version_path("/nonexistent-folder", "0", now=1.9999995231628418)
    stamp = disk.version_stamp(kept.rsplit("/", 1)[-1])
    assert stamp is not None and stamp.timestamp() == 1


def test_an_edit_copies_the_unchanged_runs_from_the_previous_version(tmp_path: Path) -> None:
    """steps.copy_from_previous: a 100-byte insert leaves everything but the chunk it
    landed in (and at most its neighbour) to be copied from the file already here; the
    result, with the rest written from verified bytes, is the new content."""
    from p2pfs.content.chunking import Chunker  # noqa: PLC0415
    from p2pfs.daemon.folders.steps import copy_from_previous  # noqa: PLC0415
    from p2pfs.store.assemble import PartialFile  # noqa: PLC0415
    from p2pfs.store.index import CHUNK_RECORD  # noqa: PLC0415
    from tests.helpers_content import random_bytes  # noqa: PLC0415

    chunker = Chunker()
    old = random_bytes(11, 3 << 20)
    new = old[: 1 << 20] + b"i" * 100 + old[1 << 20 :]
    (tmp_path / "f.bin").write_bytes(old)
    previous = b"".join(CHUNK_RECORD.pack(ref.id, ref.length) for ref in chunker.chunk_refs(old))
    leaves, offset = [], 0
    for ref in chunker.chunk_refs(new):
        leaves.append((offset, ref))
        offset += ref.length
    with PartialFile(str(tmp_path), "f.bin", bytes(32), len(new)) as partial:
        done = copy_from_previous(str(tmp_path), "f.bin", partial, previous, leaves)
        assert len(leaves) - 2 <= len(done) < len(leaves)
        for start, ref in leaves:
            if start not in done:
                partial.write_chunk(start, new[start : start + ref.length], ref)
        partial.commit(executable=False)
    assert (tmp_path / "f.bin").read_bytes() == new
