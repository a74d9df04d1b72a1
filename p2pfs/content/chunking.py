"""Content-defined chunking (FastCDC 2020) and chunk ids (BLAKE3-256 of the chunk bytes).

Identical bytes give identical cuts wherever they sit, so one chunk store dedups across files
and machines, and an insertion changes only the chunk it lands in (plus rarely its neighbour).
The parameters are part of every manifest because another FastCDC version or size cuts
differently and would defeat dedup, though never verification.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import blake3
from pyfastcdc import FastCDC

from p2pfs.errors import LocalProtocolError, RemoteProtocolError
from p2pfs.ids import ContentHash

CHUNKER_NAME = "fastcdc"
CHUNKER_VERSION = "2020"

# Bounds for params read from untrusted manifests (pyfastcdc's own accepted range).
_MIN_SIZE_RANGE = (64, 1 << 20)
_AVG_SIZE_RANGE = (256, 4 << 20)
_MAX_SIZE_RANGE = (1024, 16 << 20)


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    """Everything needed to reproduce the cut points of a file."""

    name: str
    version: str
    min_size: int
    avg_size: int
    max_size: int
    normalization: int

    def to_wire(self) -> list[Any]:
        return [
            self.name,
            self.version,
            self.min_size,
            self.avg_size,
            self.max_size,
            self.normalization,
        ]

    @classmethod
    def from_wire_untrusted(cls, value: object) -> ChunkerParams:
        if not isinstance(value, list) or len(value) != 6:
            raise RemoteProtocolError("chunker params: expected a 6-element array")
        name, version, min_size, avg_size, max_size, normalization = value
        if not isinstance(name, str) or not isinstance(version, str):
            raise RemoteProtocolError("chunker params: name and version must be strings")
        if len(name) > 32 or len(version) > 32:
            raise RemoteProtocolError("chunker params: name or version too long")
        for field_value, (low, high) in (
            (min_size, _MIN_SIZE_RANGE),
            (avg_size, _AVG_SIZE_RANGE),
            (max_size, _MAX_SIZE_RANGE),
        ):
            if type(field_value) is not int or not low <= field_value <= high:
                raise RemoteProtocolError(f"chunker params: size {field_value!r} out of range")
        if not min_size <= avg_size <= max_size:
            raise RemoteProtocolError("chunker params: need min <= avg <= max")
        if type(normalization) is not int or not 0 <= normalization <= 3:
            raise RemoteProtocolError("chunker params: normalization must be 0..3")
        return cls(name, version, min_size, avg_size, max_size, normalization)

    def is_supported(self) -> bool:
        """True when this node can reproduce these cuts (needed for dedup, not for verify)."""
        return self.name == CHUNKER_NAME and self.version == CHUNKER_VERSION


# Chosen by measurement (SPEC.md, "Chunk sizes"): the mean chunk is ~77 KiB, an insertion
# changes one chunk, and the index stays under 1 MiB of metadata per GiB of data.
DEFAULT_CHUNKER = ChunkerParams(
    name=CHUNKER_NAME,
    version=CHUNKER_VERSION,
    min_size=16 * 1024,
    avg_size=64 * 1024,
    max_size=256 * 1024,
    normalization=1,
)


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A chunk as a file's tree lists it: its id and its length in bytes."""

    id: ContentHash
    length: int


def chunk_id(data: bytes | bytearray | memoryview) -> ContentHash:
    """BLAKE3-256 of the chunk bytes: the chunk's name everywhere."""
    return ContentHash(blake3.blake3(data).digest())


class Chunker:
    """Cuts buffers into content-defined chunks with fixed parameters."""

    __slots__ = ("_fastcdc", "params")

    def __init__(self, params: ChunkerParams = DEFAULT_CHUNKER) -> None:
        if not params.is_supported():
            raise LocalProtocolError(f"unsupported chunker {params.name} {params.version}")
        self.params = params
        self._fastcdc = FastCDC(
            params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=params.normalization,  # type: ignore[arg-type]
        )

    def cut(self, buffer: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Yield the chunks of a whole buffer as views into it (no copies)."""
        for piece in self._fastcdc.cut_buf(buffer):
            yield piece.data

    def cut_lengths(self, buffer: bytes | bytearray | memoryview) -> list[int]:
        """Cut lengths only; the fast path when hashing happens elsewhere."""
        return [piece.length for piece in self._fastcdc.cut_buf(buffer)]

    def chunk_refs(self, buffer: bytes | bytearray | memoryview) -> list[ChunkRef]:
        """Cut and hash a whole buffer (convenient for tests and small files)."""
        return [ChunkRef(chunk_id(view), len(view)) for view in self.cut(buffer)]


class StreamCutter:
    """Cuts a byte stream that arrives in blocks, giving exactly the cuts of the whole stream.

    A cut is final only once ``max_size`` bytes past the chunk's start are known (or the
    stream has ended), so the unfinished tail of each block is carried into the next one.
    Memory is bounded by one block plus ``max_size``.
    """

    __slots__ = ("_carry", "_chunker", "offset")

    def __init__(self, chunker: Chunker) -> None:
        self._chunker = chunker
        self._carry = b""
        self.offset = 0
        """Stream offset of the first byte not yet emitted as a chunk."""

    def feed(self, block: bytes | bytearray | memoryview) -> list[memoryview]:
        """Add the next block; return the chunks that are now final (views, valid forever)."""
        buffer = self._carry + block if self._carry else bytes(block)
        max_size = self._chunker.params.max_size
        chunks: list[memoryview] = []
        start = 0
        for piece in self._chunker._fastcdc.cut_buf(buffer):
            if len(buffer) - start < max_size:
                break
            chunks.append(piece.data)
            start += piece.length
        self._carry = buffer[start:]
        self.offset += start
        return chunks

    def finish(self) -> list[memoryview]:
        """End of stream: every remaining byte is cut."""
        buffer, self._carry = self._carry, b""
        chunks = list(self._chunker.cut(buffer))
        self.offset += len(buffer)
        return chunks
