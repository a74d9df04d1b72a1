"""Re-chunking a changed file when its previous chunk list is known: the cuts are exactly
those a full FastCDC pass gives (property-tested against it), but FastCDC runs only around
the changed regions.

Why this is exact: FastCDC decides each cut from the chunk's start alone; the cut after a
start ``p`` depends only on the bytes ``[p, cut)`` (a cut found before the data ends is the
same whatever follows it). So where the new data holds, at a cut ``p``, the bytes of an old
chunk that was not the old file's last one (its cut was not forced by the old end of file),
the next cut is at ``p`` plus that chunk's length. The bytes are checked by the chunk's
BLAKE3 id, which every chunk needs anyway. The old file's last chunk is trusted only where
it ends the new data too.

Walk: expect old chunk 0 at offset 0; while each expected chunk's bytes match, take it and
expect the next. At the first mismatch (the edit), cut with FastCDC from there, a window at
a time; as soon as a cut chunk's id is one of the old chunks (content-defined cuts fall
back into step after an insert or overwrite), expect that chunk's successor again. An edit
thus costs FastCDC over a chunk or two; everything else is hashed once, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2pfs.content.chunking import Chunker, ChunkRef, chunk_id
from p2pfs.ids import ContentHash

CUT_WINDOW = 1 << 20
"""Bytes cut per FastCDC call once out of step (bounded waste when it steps back in)."""


class Rechunker:
    """Cuts a byte stream that arrives in blocks into the chunks a full pass would give,
    using the stream's previous chunk list to skip FastCDC where the bytes are unchanged.

    Feed blocks in order, then call :meth:`finish`; each returns the chunks now final,
    with their ids. Memory: one block plus ``max_size`` (as StreamCutter).
    """

    __slots__ = ("_buffer", "_chunker", "_expect", "_old", "_pending", "_successor", "cut_bytes")

    def __init__(self, chunker: Chunker, old: Sequence[ChunkRef]) -> None:
        self._chunker = chunker
        self._old = list(old)
        self._successor: dict[ContentHash, int] = {}
        """Old chunk id -> the index of the old chunk after its first occurrence."""
        for position in range(len(self._old) - 1, -1, -1):
            self._successor[self._old[position].id] = position + 1
        self._expect: int | None = 0 if self._old else None
        """The old chunk expected at the current offset (None: out of step, cut)."""
        self._pending: int | None = None
        """An old chunk whose bytes matched at the buffer's start, taken once the byte after
        it is known unchanged: FastCDC's cut test at a cut reads that byte too."""
        self._buffer = b""
        self.cut_bytes = 0
        """Bytes FastCDC ran over (what the old list could not vouch for)."""

    def feed(self, block: bytes | bytearray | memoryview) -> list[ChunkRef]:
        self._buffer = self._buffer + bytes(block) if self._buffer else bytes(block)
        chunks, kept = self.scan(memoryview(self._buffer), final=False)
        self._buffer = self._buffer[kept:]
        return chunks

    def finish(self) -> list[ChunkRef]:
        chunks, kept = self.scan(memoryview(self._buffer), final=True)
        assert kept == len(self._buffer) and self._pending is None
        self._buffer = b""
        return chunks

    def scan(self, view: memoryview, final: bool) -> tuple[list[ChunkRef], int]:
        """For a caller that keeps its own buffer (no joining of blocks): ``view`` holds
        the bytes kept from the last call followed by new ones; returns the chunks now
        final and the offset from which the bytes must be kept for the next call (at
        most two chunks of ``max_size``, the one pending and the one checked after it;
        ``len(view)`` once ``final``)."""
        end = len(view)
        out: list[ChunkRef] = []
        pending = self._pending
        pending_start = 0
        start = 0 if pending is None else self._old[pending].length
        while True:
            expect = self._expect
            if expect is not None:
                ref = self._old[expect]
                last = expect == len(self._old) - 1
                known = end - start
                if not final and (known < ref.length or (last and known == ref.length)):
                    break  # more bytes (or the end) are needed to check it
                matched = (
                    known >= ref.length and chunk_id(view[start : start + ref.length]) == ref.id
                )
                if matched:
                    if pending is not None:  # the byte after it is as it was: its cut holds
                        out.append(self._old[pending])
                        pending = None
                    if last:
                        self._expect = None
                        if known == ref.length:  # it ends the new data as it ended the old
                            out.append(ref)
                            start += ref.length
                        continue
                    pending, pending_start = expect, start
                    start += ref.length
                    self._expect = expect + 1
                    continue
                self._expect = None
                if pending is not None:
                    if final and start == end:
                        out.append(self._old[pending])  # it ends the data: its cut holds
                    else:
                        start = pending_start  # its cut is not proven: cut from there
                    pending = None
                continue
            moved = self._cut(view, start, final, out)
            if moved == start:
                break
            start = moved
        self._pending = pending
        return out, pending_start if pending is not None else start

    def _cut(self, view: memoryview, start: int, final: bool, out: list[ChunkRef]) -> int:
        """Out of step: FastCDC over a window from ``start``, until a chunk is one of the
        old ones; returns the offset reached (``start`` if more bytes are needed)."""
        end = len(view)
        max_size = self._chunker.params.max_size
        window_end = min(end, start + max(CUT_WINDOW, max_size))
        if start >= end or (window_end - start < max_size and not (final and window_end == end)):
            return start  # a cut is final only with max_size bytes known (or the end)
        window = view[start:window_end]
        self.cut_bytes += len(window)
        for piece in self._chunker.cut(window):
            if window_end - start < max_size and not (final and window_end == end):
                break
            cid = chunk_id(piece)
            out.append(ChunkRef(cid, len(piece)))
            start += len(piece)
            following = self._successor.get(cid)
            if following is not None and following < len(self._old):
                self._expect = following  # back in step with the old cuts
                break
        return start


def rechunk(chunker: Chunker, old: Sequence[ChunkRef], data: bytes) -> list[ChunkRef]:
    """The chunks of ``data`` (as ``chunker.chunk_refs(data)``), reusing ``old``'s cuts."""
    rechunker = Rechunker(chunker, old)
    return rechunker.feed(data) + rechunker.finish()
