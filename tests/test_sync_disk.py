"""The file-system steps of applying folder changes (real directories, no daemon)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from p2pfs.daemon.folders import disk
from p2pfs.errors import StorageError


def test_ignore_rules_follow_gitignore_and_always_skip_state(tmp_path: Path) -> None:
    rules = disk.IgnoreRules(str(tmp_path))
    assert not rules("notes.txt")
    assert rules(".p2pfs/versions/a~20260101-000000.txt")
    assert rules("sub/.p2pfs-part-abc-notes.txt")
    (tmp_path / disk.IGNORE_FILE).write_text("*.log\nbuild/\n!keep.log\n/top-only\n")
    rules.reload()
    assert rules("a.log") and rules("deep/dir/b.log")
    assert not rules("keep.log")
    assert rules("build", is_directory=True) and rules("build/out/x.o")
    assert rules("top-only") and not rules("sub/top-only")
    assert not rules(disk.IGNORE_FILE)  # the patterns themselves are synced
    (tmp_path / disk.IGNORE_FILE).unlink()
    rules.reload()
    assert not rules("a.log")


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
