"""The client side of GetTree: a share's tree nodes pushed with its manifest, read as a
walk needs them.

A fetch asks GetTree beside GetManifest, so one round trip brings the manifest and (within
the budget) every tree node; its walk then takes nodes from here and asks GetNodes only for
the rest. Nothing here is trusted: a node is keyed by the hash computed here under its own
tree's key, so it can only stand in for that hash, and the walk verifies it against its
parent as it would a node it asked for. Whatever goes wrong with the push (refused by a
peer that does not know GetTree, a protocol violation, a stall) only ends the push.

No background task: frames are read when a walk waits for a node not here yet (QUIC holds
the rest meanwhile, within the stream's window), so a failure never escapes a nursery.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from p2pfs.content.folder import DIR_TREE, FILE_TREE
from p2pfs.errors import ConnectionClosedError, RemoteProtocolError, StreamResetError
from p2pfs.ids import ContentHash
from p2pfs.net import PeerConnection
from p2pfs.wire.codes import ErrorCode

from .requests import RequestStream
from .streams import TransferCounters

logger = logging.getLogger(__name__)

PUSH_BUDGET = 4 << 20
"""Node bytes a fetch accepts pushed: the trees of ~90,000 small files (~45 bytes a
file-tree leaf, ~60 a directory entry), all held in memory until the walk has taken them."""
AskNodes = Callable[[list[ContentHash]], Awaitable[list[bytes]]]
"""Nodes by hash from the peer (RequestStream.nodes)."""
_PUSH_FAILURES = (RemoteProtocolError, ConnectionClosedError, StreamResetError, trio.TooSlowError)


class TreePush:
    """The nodes one GetTree brings, by hash."""

    def __init__(self, peer: str, stream: RequestStream | None, reply_within: float) -> None:
        self.nodes: dict[ContentHash, bytes] = {}
        self.pushed = 0
        """Nodes received so far (a node sent twice counts twice)."""
        self.asked = 0
        """Nodes asked for by hash (GetNodes) because the push did not bring them."""
        self._peer = peer
        self._stream = stream
        self._reply_within = reply_within

    @classmethod
    async def ask(
        cls,
        conn: PeerConnection,
        share_root: ContentHash,
        counters: TransferCounters,
        *,
        reply_within: float,
        file_trees: bool = True,
        budget: int = PUSH_BUDGET,
    ) -> TreePush:
        """Send the GetTree on a stream of its own; nothing is read yet. ``file_trees``:
        file-tree nodes too (a fetch), else directory trees alone (a listing)."""
        peer = conn.peer_id.short()
        try:
            stream = await RequestStream.open(conn, counters)
            await stream.ask_tree(share_root, budget, file_trees=file_trees)
        except _PUSH_FAILURES as exc:
            logger.info("could not ask holder %s for its trees: %s", peer, exc)
            return cls(peer, None, reply_within)
        return cls(peer, stream, reply_within)

    async def take(self, hashes: list[ContentHash], ask: AskNodes) -> list[bytes]:
        """The nodes ``hashes`` name, in order: pushed ones (read as they come), the rest
        from ``ask`` (GetNodes), all unverified."""
        await self.wait_for(hashes)
        missing = [node_hash for node_hash in hashes if node_hash not in self.nodes]
        got: dict[ContentHash, bytes] = {}
        if missing:
            self.asked += len(missing)
            got = dict(zip(missing, await ask(missing), strict=True))
        return [self.nodes[h] if h in self.nodes else got[h] for h in hashes]

    async def wait_for(self, hashes: list[ContentHash]) -> None:
        """Read frames until every hash is here or the push has ended. The wait is bounded
        as a GetNodes reply is (``reply_within``), not per frame: a holder drip-feeding
        frames (each in time, none bringing what is waited for) would hold the walk for
        as long as it liked; past the bound the push is stopped and the walk asks."""
        here = 0
        with trio.move_on_after(self._reply_within) as late:
            while self._stream is not None:
                while here < len(hashes) and hashes[here] in self.nodes:
                    here += 1
                if here == len(hashes):
                    return
                await self._read_frame(self._stream)
        if late.cancelled_caught:
            logger.info("holder %s pushed its trees too slowly: asking for them", self._peer)
            self._stop()

    async def _read_frame(self, stream: RequestStream) -> None:
        try:
            frame = await stream.tree_frame(reply_within=self._reply_within)
        except _PUSH_FAILURES as exc:
            # What came before stays usable: each node is checked where it is used.
            logger.info("holder %s stopped pushing trees: %s", self._peer, exc)
            self._stop()
            return
        self.nodes.update((DIR_TREE.node_hash(node), node) for node in frame.dir_nodes)
        self.nodes.update((FILE_TREE.node_hash(node), node) for node in frame.file_nodes)
        self.pushed += len(frame.dir_nodes) + len(frame.file_nodes)
        if frame.last:
            self._stream = None
            with contextlib.suppress(*_PUSH_FAILURES):
                await stream.close()  # answered whole: the stream is done

    def _stop(self) -> None:
        if self._stream is not None:
            self._stream.stream.reset(int(ErrorCode.CANCELLED))  # the server stops sending
            self._stream = None

    def end(self) -> None:
        """The walks are done (or failed): stop the push and let go of its nodes."""
        self._stop()
        self.nodes.clear()
