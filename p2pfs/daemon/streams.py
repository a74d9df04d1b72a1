"""What both ends of a request stream share: the counters of what crossed the wire and the
frame deadline on receive. The serving side (``service``) and the fetching side
(``requests``, ``fetcher``, ``swarmfetch``, folder clients) import them from here rather than
from each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from p2pfs.net import Stream
from p2pfs.wire.codes import ErrorCode, WireError
from p2pfs.wire.session import StreamSession


@dataclass(slots=True)
class TransferCounters:
    """What crossed the wire, for `p2pfs status`: chunk payload vs everything else."""

    payload_sent: int = 0
    protocol_sent: int = 0
    payload_received: int = 0
    protocol_received: int = 0
    chunks_served: int = 0
    integrity_failures: int = 0
    chunks_received: int = 0
    """Chunks peers sent us (each is hashed before it is written)."""
    chunks_rejected: int = 0
    """Times a peer's chunks failed their hash (the batch is dropped, the peer banned)."""


async def receive_within_frame_deadline(
    stream: Stream, session: StreamSession, max_bytes: int
) -> bytes:
    """The stream's next bytes; WireError if the peer leaves a frame unfinished past its
    deadline (bytes already buffered are always read first: we may just have been busy)."""
    deadline = session.frame_deadline()
    if deadline is None or stream.receive_buffered:
        return await stream.receive_some(max_bytes)
    with trio.move_on_at(deadline):
        return await stream.receive_some(max_bytes)
    raise WireError(ErrorCode.PROTOCOL_VIOLATION, "a frame was left unfinished too long")
