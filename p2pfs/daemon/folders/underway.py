"""Changes under way: the chunks this node holds verified in files it has not committed yet
(served to members taking the same change, as Syncthing's DownloadProgress lets them), and
what each linked member says it is placing (so we may ask it for those chunks).

A folder change reaches every other member at once, and each used to take all of it from
the member that made it: with three members that member sent each new byte twice. Members
placing the same root now swap what each has already placed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import ContentHash
from p2pfs.store.assemble import PartialFile
from p2pfs.store.index import ChunkLocation
from p2pfs.wire.messages import MAX_PLACING_HELD, MAX_PLACING_IDS, FolderPlacing

RATE_AFTER = 0.5
RATE_CHUNKS = 32
"""A member's placing rate is measured over at least this long and this many chunks."""
NOTHING = ContentHash(bytes(32))
"""The root a FolderPlacing names when the server places nothing now."""
MAX_PLACING_TOLD = 1 << 17
"""Chunks one placement tells of at most (8 GiB at the mean chunk; ~30 MiB of entries):
beyond, members take the rest from its maker."""


@dataclass(slots=True)
class PlacingChunks:
    """This node's placement now (one at a time per folder: a reconcile holds its lock):
    the root it takes, and each chunk verified and written toward it, in order."""

    root: ContentHash | None = None
    generation: int = 0
    """Bumped by every begin: a watcher that saw another generation starts its list again."""
    ids: list[bytes] = field(default_factory=list)
    _where: dict[bytes, tuple[tuple[str, str], int]] = field(default_factory=dict)
    """Chunk id -> (its file's temp and final paths, offset)."""
    changed: trio.Event = field(default_factory=trio.Event)
    """Set (then replaced) when a placement begins, grows or ends."""

    def begin(self, root: ContentHash) -> None:
        self._reset(root)

    def end(self) -> None:
        self._reset(None)

    def add(self, placed: Iterable[tuple[bytes, PartialFile, int]]) -> None:
        """Chunks now written (and verified) at ``offset`` of ``partial``'s file."""
        if self.root is None:
            return
        grew = False
        for chunk_id, partial, offset in placed:
            if chunk_id not in self._where and len(self.ids) < MAX_PLACING_TOLD:
                self._where[chunk_id] = ((partial.temp_path, partial.final_path), offset)
                self.ids.append(chunk_id)
                grew = True
        if grew:
            self._wake()

    def locations(self, chunk_id: bytes, length: int) -> list[ChunkLocation]:
        """Where a held chunk may be read: its temp file, or the file it became once
        committed (the reader checks the bytes against the id either way)."""
        held = self._where.get(chunk_id)
        if held is None:
            return []
        paths, offset = held
        return [ChunkLocation(path, offset, length) for path in paths]

    def frames(self, request_id: int, seen: tuple[int, int] | None) -> list[FolderPlacing]:
        """What a watcher that was last told ``seen`` (generation, ids sent) is due now
        (nothing, if it is up to date), and that watcher's new ``seen`` is ``self.seen``."""
        generation, sent = seen if seen is not None else (-1, 0)
        if generation != self.generation:
            sent = 0
        elif sent == len(self.ids):
            return []
        root = self.root if self.root is not None else NOTHING
        new = self.ids[sent:] if self.root is not None else []
        frames = [
            FolderPlacing(request_id, root, sent + at, tuple(new[at : at + MAX_PLACING_IDS]))
            for at in range(0, len(new), MAX_PLACING_IDS)
        ]
        return frames or [FolderPlacing(request_id, root, sent, ())]

    @property
    def seen(self) -> tuple[int, int]:
        return self.generation, len(self.ids)

    def _reset(self, root: ContentHash | None) -> None:
        self.root = root
        self.generation += 1
        self.ids = []
        self._where = {}
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass(slots=True)
class MemberPlacing:
    """What one linked member last said it is placing (FolderPlacing on its watch)."""

    root: ContentHash | None = None
    held: set[bytes] = field(default_factory=set)
    _count: int = 0
    changed: trio.Event = field(default_factory=trio.Event)
    grew_at: float = float("-inf")
    """When (trio's clock) it last told of chunks placed, or began its list: a placer
    just begun has as long to place its first chunks as it has between later ones."""
    first_at: float = 0.0
    """When it first told of a chunk placed toward its root (trio's clock)."""

    def update(self, message: FolderPlacing) -> None:
        """Apply one FolderPlacing; one that does not continue the list it names is a
        violation (RemoteProtocolError): the stream delivers them in order."""
        if message.start == 0:
            self.root = None if message.root == NOTHING else message.root
            self.held = set()
            self._count = 0
            self.grew_at = trio.current_time()
        elif message.root != self.root or message.start != self._count:
            raise RemoteProtocolError("a FolderPlacing that does not continue its list")
        if self._count + len(message.chunk_ids) > MAX_PLACING_HELD:
            raise RemoteProtocolError("a FolderPlacing past the chunks one placement may tell")
        if self.root is None and message.chunk_ids:
            raise RemoteProtocolError("chunk ids in a FolderPlacing of no root")
        if message.chunk_ids:
            self.grew_at = trio.current_time()
            if not self._count:
                self.first_at = self.grew_at
        self.held.update(message.chunk_ids)
        self._count += len(message.chunk_ids)
        self.changed.set()
        self.changed = trio.Event()

    def chunk_rate(self, now: float) -> float:
        """Chunks a second it has placed since its first; infinite until that is known
        (RATE_AFTER seconds and RATE_CHUNKS chunks)."""
        span = now - self.first_at
        if self._count < RATE_CHUNKS or span < RATE_AFTER:
            return math.inf
        return self._count / span

    def holds(self, root: ContentHash, chunk_ids: Iterable[bytes]) -> bool:
        return self.root == root and self.held.issuperset(chunk_ids)

    def forget(self) -> None:
        """The member's watch ended: what it said no longer stands."""
        self.root = None
        self.held = set()
        self._count = 0
