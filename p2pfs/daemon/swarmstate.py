"""Shares this node is fetching (or fetched since it started), so it can serve them to others
while still downloading: what it holds, where each held chunk lies, and who to tell when a
piece arrives."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from p2pfs.content.chunking import ChunkRef
from p2pfs.ids import ContentHash
from p2pfs.store.assemble import PartialFile
from p2pfs.wire.messages import bitfield_of

logger = logging.getLogger(__name__)

SUBSCRIBER_BACKLOG = 4096
"""Updates queued for one subscriber; a subscriber that falls further behind is dropped (it
still has the pieces it was told of, and may subscribe again)."""


@dataclass(slots=True)
class PieceLocation:
    """Where a held piece's bytes are: a file under construction (temp until committed)."""

    partial: PartialFile
    offset: int

    def candidate_paths(self) -> tuple[str, str]:
        return self.partial.temp_path, self.partial.final_path


@dataclass(slots=True)
class SwarmShare:
    root: ContentHash
    manifest: bytes
    nodes: dict[ContentHash, bytes] = field(default_factory=dict)
    """Every verified tree node (directory and file trees): served to other fetchers."""
    pieces: list[ChunkRef] = field(default_factory=list)
    index_of: dict[bytes, int] = field(default_factory=dict)
    held: bytearray = field(default_factory=bytearray)
    locations: dict[int, PieceLocation] = field(default_factory=dict)
    complete: bool = False
    _subscribers: list[trio.MemorySendChannel[list[int]]] = field(default_factory=list)

    def set_pieces(self, pieces: list[ChunkRef]) -> None:
        self.pieces = pieces
        self.index_of = {ref.id: index for index, ref in enumerate(pieces)}
        self.held = bytearray(len(pieces))

    def bitfield(self) -> bytes:
        return bitfield_of((i for i, flag in enumerate(self.held) if flag), len(self.pieces))

    def add(self, pieces: list[tuple[int, PieceLocation]]) -> None:
        """Record held pieces and tell every subscriber."""
        fresh = []
        for index, location in pieces:
            if not self.held[index]:
                self.held[index] = 1
                self.locations[index] = location
                fresh.append(index)
        if not fresh:
            return
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(fresh)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)
                channel.close()

    def subscribe(self) -> trio.MemoryReceiveChannel[list[int]]:
        send, receive = trio.open_memory_channel[list[int]](SUBSCRIBER_BACKLOG)
        self._subscribers.append(send)
        return receive

    def close(self) -> None:
        for channel in self._subscribers:
            channel.close()
        self._subscribers.clear()


@dataclass(slots=True)
class SwarmRegistry:
    shares: dict[ContentHash, SwarmShare] = field(default_factory=dict)

    def get(self, root: ContentHash) -> SwarmShare | None:
        return self.shares.get(root)
