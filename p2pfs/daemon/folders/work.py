"""What handling a folder's changes has cost, in counts (issue 16's work per change)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class FolderWork:
    """What handling this folder's changes has cost so far, in counts (not time): one
    change should cost O(the change) whatever the folder's size (issue 16). Listed in
    `sync list --json` as ``work``."""

    full_scans: int = 0
    partial_scans: int = 0
    files_scanned: int = 0
    """Regular files a scan listed and stat-ed (hashed, reused or renamed)."""
    paths_compared: int = 0
    """Disk paths and records that local change detection compared."""
    records_planned: int = 0
    """A member's records the planner was given."""
    records_verified: int = 0
    """A member's records whose own signatures were checked (a read-only member's)."""
    records_vouched: int = 0
    """A member's records taken under its signed index root: each checked against its
    leaf's hash, not by its own signature (a read-write member's)."""
    records_stored: int = 0
    index_nodes_made: int = 0
    """Index-tree nodes encoded by updates (a rebuild makes them all)."""
    file_nodes_walked: int = 0
    """File-tree nodes placements asked members for (the rest were held here)."""
    nodes_pushed: int = 0
    """Index nodes, records and file-tree nodes a reconcile took from what a member pushed
    after its root (FolderNodes), not asking for them."""
    nodes_asked: int = 0
    """Index nodes, records and file-tree nodes asked of members by hash (GetNodes)."""
