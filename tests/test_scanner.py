"""The scanner on real files: roots, rescans, and every kind of bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker
from p2pfs.store import folderdisk, scanner
from p2pfs.store.assemble import PARTIAL_PREFIX
from p2pfs.store.filehash import BLOCK_SIZE, hash_file_once
from p2pfs.store.index import IndexStore
from p2pfs.store.partscan import scan_directories, sift_changed_paths
from p2pfs.store.placed import PlacedFile, record_placed_files
from p2pfs.store.scanner import RACY_WINDOW_NS, FileState, ScanResult, scan_share

OLD_NS = 1_600_000_000 * 10**9
"""mtime given to test files so they are not racily clean at the first scan."""


def write(path: Path, data: bytes, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o755 if executable else 0o644)
    os.utime(path, ns=(OLD_NS, OLD_NS))


def scan(tmp_path: Path, target: Path, home: str = "home", **kwargs: object) -> ScanResult:
    (tmp_path / home).mkdir(exist_ok=True)
    with IndexStore(tmp_path / home / "index.sqlite3") as index:
        return scan_share(target, index, **kwargs)  # type: ignore[arg-type]


NFD_NAME = unicodedata.normalize("NFD", "café")
BIG = random.Random(1).randbytes(BLOCK_SIZE + 3 * DEFAULT_CHUNKER.max_size + 12345)


def make_mixed(root: Path, reverse: bool = False) -> None:
    """The same content whichever order it is created in."""
    steps = [
        lambda: write(root / "a.txt", b"alpha"),
        lambda: write(root / "empty", b""),
        lambda: write(root / "run.sh", b"#!/bin/sh\necho hi\n", executable=True),
        lambda: write(root / "sub" / "deeper" / "big.bin", BIG),
        lambda: write(root / "sub" / NFD_NAME, "é".encode()),
        lambda: (root / "emptydir").mkdir(parents=True),
        lambda: write(root / "sub" / "日本語.txt", b"unicode"),
    ]
    for step in reversed(steps) if reverse else steps:
        step()


def test_identical_content_gives_identical_roots(tmp_path: Path) -> None:
    make_mixed(tmp_path / "one")
    make_mixed(tmp_path / "two", reverse=True)
    first = scan(tmp_path, tmp_path / "one", home="h1")
    second = scan(tmp_path, tmp_path / "two", home="h2")
    assert first.manifest.tree == second.manifest.tree
    assert first.problems == second.problems == []
    assert (first.files, first.directories) == (6, 3)
    assert first.bytes == len(BIG) + 5 + 18 + 2 + 7
    with IndexStore(tmp_path / "h1" / "index.sqlite3") as index:
        records = list(index.share_files(first.share_id))
        states = index.share_file_states(first.share_id)
    paths = [record.path for record in records]
    assert "sub/café" in paths and unicodedata.is_normalized("NFC", "sub/café")
    assert paths == sorted(paths, key=lambda p: [part.encode() for part in p.split("/")])
    # What a sync folder keeps of a scan: the same files, without chunk lists or order.
    assert sorted(states) == sorted(
        (r.path, r.root, r.size, r.mtime_ns, r.inode, r.mode) for r in records
    )


def test_big_file_chunks_match_the_chunker(tmp_path: Path) -> None:
    min_size = DEFAULT_CHUNKER.min_size
    chunker = Chunker(DEFAULT_CHUNKER)
    rng = random.Random(2)
    contents = {
        "big": BIG,
        "one": b"x",
        "at_min": rng.randbytes(min_size),
        "past_min": rng.randbytes(min_size + 1),
        "block": rng.randbytes(BLOCK_SIZE),
    }
    for name, data in contents.items():
        write(tmp_path / "share" / name, data)
    result = scan(tmp_path, tmp_path / "share")
    with IndexStore(tmp_path / "home" / "index.sqlite3") as index:
        records = {record.path: record for record in index.share_files(result.share_id)}
    for name, data in contents.items():
        assert records[name].chunk_refs() == chunker.chunk_refs(data), name
    assert result.chunks == sum(len(chunker.chunk_refs(d)) for d in contents.values())


@pytest.mark.parametrize("change", ["content", "exec", "name", "mtime"])
def test_root_changes_iff_content_changes(tmp_path: Path, change: str) -> None:
    make_mixed(tmp_path / "share")
    before = scan(tmp_path, tmp_path / "share").root
    target = tmp_path / "share" / "a.txt"
    if change == "content":  # same size; an editor leaves a new mtime
        target.write_bytes(b"alphA")
    elif change == "exec":
        os.chmod(target, 0o755)
    elif change == "name":
        target.rename(tmp_path / "share" / "b.txt")
    else:
        os.utime(target, ns=(OLD_NS + 10**9, OLD_NS + 10**9))
    after = scan(tmp_path, tmp_path / "share")
    assert (after.root != before) == (change != "mtime")
    fresh = scan(tmp_path, tmp_path / "share", home="fresh")
    assert fresh.root == after.root


def test_rescan_of_unchanged_tree_reads_nothing(tmp_path: Path) -> None:
    make_mixed(tmp_path / "share")
    first = scan(tmp_path, tmp_path / "share")
    assert first.stats.files_hashed == 6
    second = scan(tmp_path, tmp_path / "share")
    assert second.root == first.root
    assert (second.stats.files_hashed, second.stats.bytes_read) == (0, 0)
    assert second.stats.files_reused == 6
    assert (second.files, second.bytes, second.chunks) == (first.files, first.bytes, first.chunks)

    os.utime(tmp_path / "share" / "sub" / "日本語.txt", ns=(OLD_NS + 5, OLD_NS + 5))
    third = scan(tmp_path, tmp_path / "share")
    assert (third.stats.files_hashed, third.stats.bytes_read) == (1, len(b"unicode"))
    assert third.root == first.root


def test_deletions_leave_the_index(tmp_path: Path) -> None:
    make_mixed(tmp_path / "share")
    scan(tmp_path, tmp_path / "share")
    (tmp_path / "share" / "sub" / "deeper" / "big.bin").unlink()
    (tmp_path / "share" / "sub" / "deeper").rmdir()
    (tmp_path / "share" / "a.txt").unlink()
    after = scan(tmp_path, tmp_path / "share")
    fresh = scan(tmp_path, tmp_path / "share", home="fresh")
    assert after.root == fresh.root and after.files == 4
    with IndexStore(tmp_path / "home" / "index.sqlite3") as index:
        assert len(list(index.share_files(after.share_id))) == 4
        assert index.locate_chunk(Chunker().chunk_refs(BIG)[0].id) == []


def test_racily_clean_files_are_read_again(tmp_path: Path) -> None:
    write(tmp_path / "share" / "f", b"data")
    mtime = os.stat(tmp_path / "share" / "f").st_mtime_ns
    first = scan(tmp_path, tmp_path / "share", now_ns=mtime + RACY_WINDOW_NS // 2)
    again = scan(tmp_path, tmp_path / "share", now_ns=mtime + 10 * RACY_WINDOW_NS)
    assert again.stats.files_hashed == 1  # its mtime was too close to the first scan
    settled = scan(tmp_path, tmp_path / "share", now_ns=mtime + 20 * RACY_WINDOW_NS)
    assert settled.stats.files_hashed == 0
    assert first.root == again.root == settled.root


def test_a_size_that_moved_before_its_mtime_is_read_again_once_the_time_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncate seen between its size update and its time update (new size, old mtime)
    is read again after a pause: the record gets the mtime the write left, not the one
    before it. One whose mtime was set back on purpose keeps it (and is read once)."""
    target = tmp_path / "share" / "seed.txt"
    write(target, b"there before the folder was shared\n")
    scan(tmp_path, tmp_path / "share")
    # The torn state: emptied, the old mtime still on it.
    target.write_bytes(b"")
    os.utime(target, ns=(OLD_NS, OLD_NS))
    landed = OLD_NS + 7 * 10**9
    pauses: list[float] = []

    def time_update_lands(seconds: float) -> None:
        pauses.append(seconds)
        os.utime(target, ns=(landed, landed))

    monkeypatch.setattr(scanner, "_pause", time_update_lands)
    result = scan(tmp_path, tmp_path / "share")
    assert len(pauses) == 1
    with IndexStore(tmp_path / "home" / "index.sqlite3") as index:
        [row] = index.share_files(result.share_id)
    assert (row.size, row.mtime_ns) == (0, landed)

    # Set back on purpose (cp -p of a shorter file): the same stat after the pause, so
    # kept, and not read a second time.
    target.write_bytes(b"short")
    os.utime(target, ns=(landed, landed))
    monkeypatch.setattr(scanner, "_pause", pauses.append)
    result = scan(tmp_path, tmp_path / "share")
    assert len(pauses) == 2
    assert result.stats.files_hashed == 1 and result.stats.bytes_read == 5
    with IndexStore(tmp_path / "home" / "index.sqlite3") as index:
        [row] = index.share_files(result.share_id)
    assert (row.size, row.mtime_ns) == (5, landed)


def test_files_written_with_one_fixed_mtime_cost_a_bounded_number_of_pauses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that writes every file with one mtime (SOURCE_DATE_EPOCH) changes sizes
    and keeps mtimes: the scan pauses for at most TORN_REREADS_PER_SCAN of them."""
    count = scanner.TORN_REREADS_PER_SCAN + 6
    for number in range(count):
        write(tmp_path / "share" / f"f{number}", b"x" * number)
    scan(tmp_path, tmp_path / "share")
    for number in range(count):
        write(tmp_path / "share" / f"f{number}", b"y" * (number + 1))
    pauses: list[float] = []
    monkeypatch.setattr(scanner, "_pause", pauses.append)
    result = scan(tmp_path, tmp_path / "share")
    assert len(pauses) == scanner.TORN_REREADS_PER_SCAN
    assert result.stats.files_hashed == count  # each file counted once
    assert result.bytes == sum(number + 1 for number in range(count))


def test_single_file_share(tmp_path: Path) -> None:
    write(tmp_path / "report.pdf", b"%PDF")
    write(tmp_path / "other", b"not shared")
    result = scan(tmp_path, tmp_path / "report.pdf")
    assert result.manifest.single_file and result.manifest.name == "report.pdf"
    assert (result.files, result.bytes, result.directories) == (1, 4, 0)
    again = scan(tmp_path, tmp_path / "report.pdf")
    assert again.root == result.root and again.stats.files_hashed == 0


# -- bad input ----------------------------------------------------------------------------


def good_tree(root: Path) -> None:
    write(root / "keep.txt", b"kept")
    write(root / "dir" / "inner.txt", b"inner")


def assert_consistent(tmp_path: Path, result: ScanResult, clean_root: Path) -> None:
    """The share holds exactly the good files: same root as a tree of only those."""
    good_tree(clean_root)
    clean = scan(tmp_path, clean_root, home="clean-home")
    assert result.manifest.tree == clean.manifest.tree
    with IndexStore(tmp_path / "home" / "index.sqlite3") as index:
        paths = [record.path for record in index.share_files(result.share_id)]
    assert paths == ["dir/inner.txt", "keep.txt"]


def test_symlinks_are_reported_not_followed(tmp_path: Path) -> None:
    share = tmp_path / "share"
    good_tree(share)
    os.symlink(".", share / "dir" / "loop")
    os.symlink("keep.txt", share / "link")
    result = scan(tmp_path, share)
    reasons = {Path(p.path).name: p.reason for p in result.problems}
    assert set(reasons) == {"loop", "link"} and "symbolic link" in reasons["loop"]
    assert_consistent(tmp_path, result, tmp_path / "clean")


def test_fifo_is_skipped(tmp_path: Path) -> None:
    share = tmp_path / "share"
    good_tree(share)
    os.mkfifo(share / "pipe")
    result = scan(tmp_path, share)
    assert [(Path(p.path).name, "special file" in p.reason) for p in result.problems] == [
        ("pipe", True)
    ]
    assert_consistent(tmp_path, result, tmp_path / "clean")


def test_non_utf8_name_is_reported(tmp_path: Path) -> None:
    share = tmp_path / "share"
    good_tree(share)
    bad = os.fsencode(share) + b"/bad\xff\xfename"
    with open(bad, "wb") as out:
        out.write(b"x")
    result = scan(tmp_path, share)
    (problem,) = result.problems
    assert problem.path.endswith("bad\\xff\\xfename") and "UTF-8" in problem.reason
    assert_consistent(tmp_path, result, tmp_path / "clean")


def test_names_colliding_after_nfc_are_reported(tmp_path: Path) -> None:
    share = tmp_path / "share"
    good_tree(share)
    write(share / unicodedata.normalize("NFC", "é.txt"), b"1")
    write(share / unicodedata.normalize("NFD", "é.txt"), b"2")
    result = scan(tmp_path, share)
    assert len(result.problems) == 2
    assert all("normalisation" in p.reason for p in result.problems)
    assert_consistent(tmp_path, result, tmp_path / "clean")


def _scan_as_nobody(scratch: Path, share: Path) -> list[str]:
    """Root reads any file whatever its mode: scan in a forked child that became `nobody`."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            with IndexStore(scratch / "home" / "index.sqlite3") as index:
                result = scan_share(share, index)
            os.write(write_end, json.dumps([p.path for p in result.problems]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    return list(json.loads(output))


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    as_root = os.geteuid() == 0
    scratch = Path(tempfile.mkdtemp(prefix="p2pfs-perm-")) if as_root else tmp_path
    try:
        share = scratch / "share"
        good_tree(share)
        write(share / "secret", b"s")
        os.chmod(share / "secret", 0)
        if as_root:
            (scratch / "home").mkdir()
            for directory, _dirs, _files in os.walk(scratch):
                os.chmod(directory, 0o777)
            problems = _scan_as_nobody(scratch, share)
        else:
            problems = [p.path for p in scan(tmp_path, share).problems]
        assert [Path(path).name for path in problems] == ["secret"]
    finally:
        if as_root:
            shutil.rmtree(scratch, ignore_errors=True)


def test_file_changing_while_read_is_retried_then_reported(tmp_path: Path) -> None:
    share = tmp_path / "share"
    good_tree(share)
    write(share / "busy.log", b"line\n")
    hook_calls = []

    def keep_writing(path: str) -> None:
        if path.endswith("busy.log"):
            hook_calls.append(path)
            with open(path, "ab") as out:
                out.write(b"more\n")

    result = scan(tmp_path, share, read_hook=keep_writing)
    assert len(hook_calls) == 3
    (problem,) = result.problems
    assert problem.path.endswith("busy.log") and "changing" in problem.reason
    assert_consistent(tmp_path, result, tmp_path / "clean")


def test_file_changed_once_is_read_again(tmp_path: Path) -> None:
    share = tmp_path / "share"
    write(share / "f", random.Random(5).randbytes(BLOCK_SIZE + 1))
    changed: list[str] = []

    def change_once(path: str) -> None:
        if not changed:
            changed.append(path)
            with open(path, "r+b") as out:
                out.write(b"new")

    result = scan(tmp_path, share, read_hook=change_once)
    assert result.problems == [] and result.stats.files_hashed == 1
    fresh = scan(tmp_path, share, home="fresh")
    assert fresh.root == result.root


def test_file_vanishing_mid_scan_is_reported(tmp_path: Path) -> None:
    share = tmp_path / "share"
    write(share / "one", b"1")
    write(share / "two", b"2")

    def delete_the_other(path: str) -> None:
        for name in ("one", "two"):
            other = share / name
            if str(other) != path and other.exists():
                other.unlink()

    result = scan(tmp_path, share, read_hook=delete_the_other)
    (problem,) = result.problems
    assert "vanished" in problem.reason and result.files == 1


def test_file_modified_by_a_thread_during_a_big_read(tmp_path: Path) -> None:
    """A real concurrent writer during the first read: the scan reads the file again once
    the writer is done, and indexes exactly one state of it, never a torn one.

    The writer only appends whole 4 KiB pages of ``x``, so every state the file passes
    through is the original bytes plus some number of pages: the indexed size is one of
    them, and the root is the root of a file holding exactly those bytes. (A writer that
    never stops is reported: test_file_changing_while_read_is_retried_then_reported.)
    """
    share = tmp_path / "share"
    original = random.Random(6).randbytes(BLOCK_SIZE * 3)
    page = b"x" * 4096
    write(share / "growing", original)
    stop = threading.Event()
    started = threading.Event()

    def writer() -> None:
        with open(share / "growing", "ab") as out:
            while not stop.is_set():
                out.write(page)
                out.flush()
                started.set()
                time.sleep(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    started.wait(10)

    def writer_done(_path: str) -> None:  # after the first read: the file stays put now
        stop.set()
        thread.join()

    try:
        result = scan(tmp_path, share, read_hook=writer_done)
    finally:
        stop.set()
        thread.join()
    assert result.problems == [] and result.files == 1
    pages, remainder = divmod(result.bytes - len(original), len(page))
    assert pages >= 1 and remainder == 0, result.bytes
    assert result.bytes == (share / "growing").stat().st_size  # the final state
    snapshot = tmp_path / "snapshot" / "share"  # the same name: the root covers it
    write(snapshot / "growing", original + page * pages)
    assert scan(tmp_path, snapshot, home="snapshot").root == result.root
    again = scan(tmp_path, share, home="again")
    assert again.problems == [] and again.root == result.root


def test_downloads_in_progress_are_not_indexed(tmp_path: Path) -> None:
    share = tmp_path / "share"
    good_tree(share)
    before = scan(tmp_path, share, home="a").root
    write(share / f"{PARTIAL_PREFIX}0123-movie.mkv", b"half a movie")
    result = scan(tmp_path, share, home="b")
    assert result.root == before
    assert result.problems == []


def test_a_renamed_or_moved_file_is_not_read_again(tmp_path: Path) -> None:
    share = tmp_path / "share"
    (share / "a").mkdir(parents=True)
    (share / "b").mkdir()
    payload = random.Random(3).randbytes(300_000)
    (share / "a" / "one.bin").write_bytes(payload)
    (share / "a" / "two.bin").write_bytes(payload[::-1])
    old = time.time_ns() - 60 * 10**9  # well outside the racy window
    for path in (share / "a" / "one.bin", share / "a" / "two.bin"):
        os.utime(path, ns=(old, old))
    with IndexStore(tmp_path / "index.sqlite3") as index:
        first = scan_share(share, index)
        (share / "a" / "one.bin").rename(share / "a" / "renamed.bin")
        (share / "a" / "two.bin").rename(share / "b" / "moved.bin")
        second = scan_share(share, index)
        assert second.stats.bytes_read == 0
        assert second.stats.files_renamed == 2
        # The content is the same, so only the directory entries differ from a fresh scan.
        with IndexStore(tmp_path / "fresh.sqlite3") as fresh:
            assert scan_share(share, fresh).root == second.root
        assert second.root != first.root


def test_partial_scan_reads_only_the_named_directories(tmp_path: Path) -> None:
    """A watcher-driven rescan lists only the directories named: an edit there is read, a
    new subdirectory is scanned whole, a removed one is dropped with all below; the other
    directories are neither listed nor read, and the next full scan gives the root a fresh
    index gives the same tree."""
    top = tmp_path / "share"
    for number in range(40):
        write(top / f"d{number % 4}" / f"f{number}.txt", b"x%d" % number * 50)
    write(top / "d3" / "deep" / "g.txt", b"deep")
    with IndexStore(tmp_path / "index.sqlite3") as index:
        scan_share(top, index)
        write(top / "d0" / "f0.txt", b"edited")
        write(top / "d0" / "new" / "n.txt", b"new file")
        shutil.rmtree(top / "d3")
        part = scan_directories(top, index, [str(top / "d0"), str(top / "d3" / "deep")])
        assert part is not None
        # d3 is gone: its nearest recorded ancestor (the top) is listed instead.
        assert sorted(part.shallow) == ["", "d0"]
        assert sorted(part.deep) == ["d0/new", "d3"]
        assert part.stats.files_hashed == 2  # the edit and the new file, nothing else
        paths = {path for path, *_rest in part.files}
        assert "d0/f0.txt" in paths and "d0/new/n.txt" in paths
        assert not any(path.startswith(("d1/", "d2/", "d3/")) for path in paths)
        assert {"d0", "d1", "d2", "d0/new"} <= set(part.directories)
        after = scan_share(top, index)
    with IndexStore(tmp_path / "fresh.sqlite3") as fresh:
        assert scan_share(top, fresh).root == after.root


def test_watched_paths_still_as_indexed_cost_no_listing(tmp_path: Path) -> None:
    """A watcher's events name files: one its index row still describes (a file this node
    placed and recorded, or one only touched) lists no directory; an edit, a delete, a new
    file and a racily clean rewrite (same size and mtime, other bytes) each list theirs."""
    top = tmp_path / "share"
    for number in range(12):
        write(top / f"d{number % 6}" / f"f{number}.txt", b"%d" % number * 40)
    racy = top / "d5" / "racy.txt"
    racy.write_bytes(b"a" * 40)  # mtime now: racily clean until a later full scan
    with IndexStore(tmp_path / "index.sqlite3") as index:
        scan_share(top, index)
        # Placed by a sync download (mtime now, so read again and found equal): recorded
        # as a scan would have, then its events arrive.
        placed = top / "d0" / "placed.txt"
        placed.write_bytes(b"placed")
        st = os.lstat(placed)
        hashed = hash_file_once(
            str(placed), Chunker(DEFAULT_CHUNKER), lambda _n: None, lambda _n: None
        )
        record_placed_files(
            index,
            str(top),
            [
                PlacedFile(
                    "d0/placed.txt",
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ino,
                    st.st_mode,
                    hashed.root,
                    hashed.chunks,
                )
            ],
        )
        os.utime(top / "d1" / "f1.txt", ns=(OLD_NS + 5, OLD_NS))  # atime only: same row
        quiet = [str(placed), str(top / "d1" / "f1.txt"), str(racy)]
        part = scan_directories(top, index, (), changed_paths=quiet)
        assert part is not None and part.shallow == [] and part.stats.files_hashed == 0
        write(top / "d2" / "f2.txt", b"edited")
        (top / "d3" / "f3.txt").unlink()
        write(top / "d4" / "new.txt", b"new")
        mtime = os.lstat(racy).st_mtime_ns
        racy.write_bytes(b"b" * 40)
        os.utime(racy, ns=(mtime, mtime))
        changed = [str(top / d) for d in ("d2/f2.txt", "d3/f3.txt", "d4/new.txt")]
        part = scan_directories(top, index, (), changed_paths=[*quiet, *changed])
        assert part is not None and sorted(part.shallow) == ["d2", "d3", "d4", "d5"]
        assert part.stats.files_hashed == 3  # the edit, the new file, the racy rewrite


def test_sifting_a_joins_noted_paths_keeps_only_the_changed_directories(tmp_path: Path) -> None:
    """What a join does with the watcher's paths after each batch: nothing to sift before
    the share's first full scan (None: the next scan lists everything anyway); after it,
    paths still as indexed are dropped and only the directories of changed, new or
    vanished files are kept, on disk and absolute."""
    top = tmp_path / "share"
    for number in range(8):
        write(top / f"d{number % 4}" / f"f{number}.txt", b"%d" % number * 30)
    with IndexStore(tmp_path / "index.sqlite3") as index:
        noted = [str(top / "d0" / "f0.txt"), str(top / "d1" / "f1.txt")]
        assert sift_changed_paths(index, top, noted) is None
        scan_share(top, index)
        assert sift_changed_paths(index, top, noted) == set()
        write(top / "d1" / "f1.txt", b"edited")
        (top / "d2" / "f2.txt").unlink()
        write(top / "d3" / "new.txt", b"new")
        noted += [str(top / "d2" / "f2.txt"), str(top / "d3" / "new.txt")]
        assert sift_changed_paths(index, top, noted) == {
            str(top / "d1"),
            str(top / "d2"),
            str(top / "d3"),
        }


def test_what_the_ignore_rule_leaves_out_is_listed(tmp_path: Path) -> None:
    """A sync folder on a file system that ignores case must know the names its ignored
    files and directories hold; a full and a partial scan list them (nothing below them)."""
    top = tmp_path / "share"
    write(top / "keep.txt", b"kept")
    write(top / "Notes.txt", b"ignored file")
    write(top / "Build" / "out.o", b"inside an ignored directory")
    write(top / "d" / "x.log", b"ignored below")

    def ignore(path: str, _is_directory: bool) -> bool:
        return path in ("Notes.txt", "Build") or path.endswith(".log")

    with IndexStore(tmp_path / "index.sqlite3") as index:
        result = scan_share(top, index, ignore=ignore)
        assert sorted(result.ignored) == ["Build", "Notes.txt", "d/x.log"]
        assert result.files == 1
        write(top / "d" / "y.log", b"new, ignored")
        part = scan_directories(top, index, [str(top / "d")], ignore=ignore)
        assert part is not None and sorted(part.ignored) == ["d/x.log", "d/y.log"]
        assert not part.files


def test_a_scan_tells_each_directorys_files_as_the_index_lists_them(tmp_path: Path) -> None:
    """A sync folder's full scan is told each directory's files once, reused, read again,
    renamed or new alike (it compares them with its records a directory at a time and
    holds no list of the folder): exactly the files the index lists after the scan."""
    make_mixed(tmp_path / "share")
    old = time.time_ns() - 10 * RACY_WINDOW_NS  # not racily clean: reused on a rescan
    for path in (tmp_path / "share").rglob("*"):
        os.utime(path, ns=(old, old), follow_symlinks=False)
    with IndexStore(tmp_path / "index.sqlite3") as index:
        told: list[list[FileState]] = []
        for change in (None, "edit", "move", "delete"):
            share = tmp_path / "share"
            if change == "edit":
                (share / "a.txt").write_bytes(b"changed\n")
            elif change == "move":
                os.rename(share / "a.txt", share / "sub" / "moved.txt")
            elif change == "delete":
                os.unlink(share / "sub" / "moved.txt")
            told.clear()
            result = scan_share(share, index, on_files=told.append)
            listed = index.share_file_states(result.share_id)
            flat = [state for directory in told for state in directory]
            assert sorted(flat) == sorted(listed) and len(flat) == result.files, change
            assert all(len({s[0].rpartition("/")[0] for s in d}) == 1 for d in told)
        assert result.files == 5 and result.stats.files_hashed == 0


def test_a_sync_folder_reads_its_files_states_from_the_index_by_tree_path(
    tmp_path: Path,
) -> None:
    """What a sync folder checks before it replaces or deletes a file comes from the scan
    index, by normalised path: names stored in another normal form (an NFD directory and
    file), many names in one directory, a missing one; dropping a row makes the next scan
    rebuild its directory's tree (the file moved away is not listed from the cache)."""
    top = tmp_path / "share"
    nfd_dir, nfd_file = unicodedata.normalize("NFD", "répertoire"), "été.txt"
    write(top / nfd_dir / unicodedata.normalize("NFD", nfd_file), b"nfd\n")
    for i in range(40):  # more than are looked up one by one
        write(top / "many" / f"f{i:02}", b"x" * i)
    write(top / "top.txt", b"top\n")
    with IndexStore(tmp_path / "index.sqlite3") as index:
        first = scan_share(top, index)
        folder = str(top)
        wanted = [
            f"{unicodedata.normalize('NFC', nfd_dir)}/{nfd_file}",
            "top.txt",
            "missing.txt",
            "many/f03",
            "many/nope",
            *(f"many/f{i:02}" for i in range(0, 40, 3)),
        ]
        states = folderdisk.scanned_states(index, folder, wanted)
        assert set(wanted) - set(states) == {"missing.txt", "many/nope"}
        st = os.lstat(top / nfd_dir / unicodedata.normalize("NFD", nfd_file))
        assert states.pop(wanted[0]) == folderdisk.DiskState(4, st.st_mtime_ns, st.st_ino)
        for path, state in states.items():
            assert state == folderdisk.state_of(folder, path), path
        many = [f"many/f{i:02}" for i in range(40)]
        assert set(folderdisk.scanned_states(index, folder, many)) == set(many)
        assert folderdisk.scanned_paths(index, folder) == {*many, "top.txt", wanted[0]}
        assert folderdisk.scanned_states(index, str(tmp_path / "elsewhere"), many) == {}

        os.unlink(top / "many" / "f05")
        index.forget_files_at(os.path.realpath(folder), ["many/f05"])
        assert "many/f05" not in folderdisk.scanned_states(index, folder, many)
        again = scan_share(top, index)
        assert again.files == first.files - 1 and again.root != first.root
        assert again.root == scan_share(top, IndexStore(tmp_path / "fresh.sqlite3")).root
