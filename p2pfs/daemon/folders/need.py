"""A folder's need: the files and bytes this node still has to fetch, out of the folder's
live files as it knows them. Members report theirs in FolderRoot (`sync list` shows each
member's completion from it); `sync list` shows ours as "syncing N%".

Kept by counters so that reading it walks no records: the record set counts live files
and bytes as records change; a plan sets what is pending; placed steps and received chunks
count it down. A reconcile plans a member's records in batches (a join's are every record):
the records it has not planned yet count as needed files, with bytes estimated from the
mean size of the records it has planned so far (their sizes are unknown until fetched).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import trio

from p2pfs.sync.recordset import RecordSet
from p2pfs.sync.versions import FileVersion
from p2pfs.wire.messages import FolderNeed


def is_file(version: FileVersion) -> bool:
    return not version.deleted and not version.is_directory


@dataclass(slots=True)
class NeedTracker:
    pending: dict[str, int] = field(default_factory=dict)
    """Files the last plan fetches that are not placed yet: path -> size."""
    pending_bytes: int = 0
    """The sum of ``pending`` when it was set (placed/received count down from it)."""
    placed_files: int = 0
    placed_bytes: int = 0
    received: int = 0
    """Placed files and bytes, and chunk bytes received, since ``pending`` was set."""
    unplanned: int = 0
    """A member's differing records that the running reconcile has not planned yet (each
    counts as a needed file: an upper bound, as some are directories or deletes)."""
    unplanned_bytes: int = 0
    """Their estimated size."""
    delta: tuple[int, int] = (0, 0)
    """Files and bytes ``pending`` adds to the records' figures (planned, not stored yet)."""
    changed: trio.Event = field(default_factory=trio.Event)
    """Set (and replaced, by the engine) whenever the need changes."""

    def plan(
        self,
        pending: dict[str, int],
        records: RecordSet,
        *,
        unplanned: int = 0,
        unplanned_bytes: int = 0,
        versions: Mapping[str, FileVersion] | None = None,
    ) -> None:
        """The files still to place are ``pending`` (a new plan's, or what one left), and
        ``unplanned`` records of ``unplanned_bytes`` (estimated) are to be planned still.
        ``versions``: the records as the plan read them ahead (else each path's is read
        from ``records``: a query a path on the event loop, 4,096 of them a join batch)."""
        self.pending = pending
        self.unplanned, self.unplanned_bytes = unplanned, unplanned_bytes
        self.pending_bytes = sum(pending.values())
        self.placed_files = self.placed_bytes = self.received = 0
        files = size = 0
        for path, new_size in pending.items():
            if versions is None:
                old = records.file_size(path)
            else:
                version = versions.get(path)
                old = version.size if version is not None and is_file(version) else None
            if old is None:
                files += 1
                size += new_size
            else:
                size += new_size - old
        self.delta = (files, size)

    def done(self) -> int:
        """Bytes of ``pending`` done: placed, or received as chunks (whichever is more)."""
        return max(self.placed_bytes, min(self.received, self.pending_bytes))

    def need(
        self, records: RecordSet, absent: Iterable[str], ignored: Callable[[str], bool]
    ) -> FolderNeed:
        """Pending files not placed yet, plus records held without content that are no
        longer ignored here (the next reconcile fetches them)."""
        files = len(self.pending) - self.placed_files + self.unplanned
        size = self.pending_bytes - self.done() + self.unplanned_bytes
        for path in absent:
            if path in self.pending or ignored(path):
                continue
            held = records.file_size(path)
            if held is not None:
                files += 1
                size += held
        return FolderNeed(
            max(files, 0),
            max(size, 0),
            max(records.files + self.delta[0] + self.unplanned, 0),
            max(records.file_bytes + self.delta[1] + self.unplanned_bytes, 0),
        )
