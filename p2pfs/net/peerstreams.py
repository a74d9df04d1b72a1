"""Which of the peer's stream ids are new and which are finished with; sans-I/O.

QUIC opens a peer's streams in id order (RFC 9000, 3.2): the first frame on stream 16 opens
stream 12 as well, and under loss or reordering stream 12's first bytes can arrive after
stream 16's. A high-water mark alone took 12 for a stream already finished with and dropped
its data, so the request on it was never answered (the lossy-path fetch's 10 s stall). The
ids a new stream skips over are therefore remembered until their first data comes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2pfs.errors import RemoteProtocolError

STREAM_ID_STEP = 4
"""Ids of one kind (initiator, direction) are this far apart (RFC 9000, 2.1)."""

SKIPPED_LIMIT = 4096
"""At most this many skipped ids are remembered. The engine already bounds how far a peer
may open ahead (its stream credit); this holds even if an engine did not."""


@dataclass
class PeerStreamIds:
    """The peer's stream ids of one kind, from ``first`` on."""

    first: int
    """The lowest id the peer's new streams can have (its first bidirectional id, or the
    next one when the first is taken by the authentication exchange)."""
    limit: int = SKIPPED_LIMIT
    _next: int = field(init=False)
    _skipped: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._next = self.first

    def opens(self, stream_id: int) -> bool:
        """The first data the engine delivers on ``stream_id``: True if it opens a stream
        the connection has not seen, False for one seen before (late data on a stream
        already finished with, to be dropped). RemoteProtocolError when the peer skips
        more ids than ``limit``."""
        if stream_id % STREAM_ID_STEP != self.first % STREAM_ID_STEP:
            raise ValueError(f"stream {stream_id} is not of this kind")
        if stream_id >= self._next:
            skipped = range(self._next, stream_id, STREAM_ID_STEP)
            if len(self._skipped) + len(skipped) > self.limit:
                raise RemoteProtocolError(
                    f"stream {stream_id} leaves more than {self.limit} streams unopened"
                )
            self._skipped.update(skipped)
            self._next = stream_id + STREAM_ID_STEP
            return True
        if stream_id in self._skipped:
            self._skipped.remove(stream_id)
            return True
        return False

    @property
    def skipped(self) -> int:
        """Ids opened by a later stream whose own first data has not come yet."""
        return len(self._skipped)
