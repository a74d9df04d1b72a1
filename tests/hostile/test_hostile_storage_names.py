"""Planted names under a folder's kept versions (issue 12, item 6).

A user's own name may carry ``~YYYYMMDD-HHMMSS`` (even an impossible date); the periodic
expiry must neither raise on it nor delete it, and must still expire real old versions.
Bound checked: expire_versions returns (no exception escapes), the user's files survive.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from p2pfs.store import folderdisk as disk

DAY = 86400.0
NOW = 1_800_000_000.0


def _plant(folder: Path, name: str) -> Path:
    path = folder / disk.VERSIONS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_planted_stamps_neither_crash_nor_vanish(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    planted = [
        # The reported case: an extension too long to be kept as one, so the user's stamp
        # comes first and everything after it looked like an extension.
        "a~20261399-999999." + "x" * 40 + "~20200101-000000",
        "b~20261399-999999",
        "c~00000000-000000.txt",
        "d.~99999999-999999",
        "plain~name.txt",
    ]
    paths = [_plant(folder, name) for name in planted]
    real_old = _plant(folder, "report~20200101-120000.txt")
    real_new = _plant(folder, disk.version_path(str(folder), "kept.txt", now=NOW).split("/")[-1])
    removed = disk.expire_versions(str(folder), keep_seconds=30 * DAY, now=NOW)
    # The first planted name does end in a real (old) stamp p2pfs could have written.
    assert removed == 2
    assert not real_old.exists() and not paths[0].exists()
    assert all(p.exists() for p in paths[1:])
    assert real_new.exists()


@given(
    stem=st.text(alphabet="ab~.-0123456789", min_size=1, max_size=40),
    when=st.floats(min_value=0, max_value=4_000_000_000),
)
def test_every_name_p2pfs_writes_reads_back_its_stamp(stem: str, when: float) -> None:
    name = stem.strip(".") or "n"
    kept = disk.version_path("/nonexistent-folder", name, now=when)
    stamp = disk.version_stamp(kept.rsplit("/", 1)[-1])
    assert stamp is not None
    assert abs(stamp.timestamp() - int(when)) < 1


@given(st.text(max_size=80))
def test_any_name_parses_without_raising(name: str) -> None:
    disk.version_stamp(name)


def test_walk_error_is_the_only_escape(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    _plant(folder, "x~20200101-000000")
    os.chmod(folder / disk.VERSIONS_DIR, 0o000)
    try:
        assert disk.expire_versions(str(folder), keep_seconds=DAY, now=NOW) >= 0
    finally:
        os.chmod(folder / disk.VERSIONS_DIR, 0o755)
