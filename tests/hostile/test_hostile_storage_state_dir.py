"""A sync folder's state is never shared or synced (issue 12, item 14).

Sharing a parent of a sync folder must not publish its `.p2pfs/versions`; a record for
`.P2PFS/...` (the same directory on a file system that ignores case) is ignored like
`.p2pfs/...`. Checked against the real scanner and the real ignore rules.
"""

from __future__ import annotations

from pathlib import Path

from p2pfs.store.index import IndexStore
from p2pfs.store.scanner import scan_share
from p2pfs.sync.ignore import IgnoreRules


def test_sharing_a_parent_never_publishes_a_sync_folders_state(tmp_path: Path) -> None:
    parent = tmp_path / "home"
    kept = parent / "Sync" / ".p2pfs" / "versions"
    kept.mkdir(parents=True)
    (kept / "secret~20260101-000000.txt").write_bytes(b"old secret")
    (parent / "Sync" / ".P2PFS").mkdir()
    (parent / "Sync" / ".P2PFS" / "x").write_bytes(b"state too")
    (parent / "Sync" / "visible.txt").write_bytes(b"shared")
    with IndexStore(tmp_path / "index.sqlite3") as index:
        result = scan_share(str(parent), index)
    assert result.manifest.file_count == 1
    assert result.manifest.tree.size == len(b"shared")


def test_state_directory_is_ignored_whatever_its_case(tmp_path: Path) -> None:
    rules = IgnoreRules()
    for path in (".p2pfs/versions/a", ".P2PFS/versions/a", ".P2pFs/folder", "sub/.p2pfs/x"):
        assert rules(path), path
    assert not rules("p2pfs/x") and not rules("a/.p2pfsx")
