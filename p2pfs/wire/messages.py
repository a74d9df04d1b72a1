"""Wire messages: one frozen dataclass per message, each with explicit to/from-wire.

A message body is a msgpack array of fields in a fixed order. Newer versions may append
fields; a decoder ignores fields past the ones it knows, so old peers keep working. Only
ChunkData carries a payload: the raw chunk bytes follow its array inside the same frame,
so chunks are never re-encoded. The normative table is protocol/WIRE.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from p2pfs.content.chunking import ChunkRef
from p2pfs.content.folder import MAX_CHUNK_LENGTH, ChunkLeafCodec
from p2pfs.content.tree import MAX_NODE_BYTES
from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import ContentHash, content_hash_untrusted
from p2pfs.wire.codes import ErrorCode, WireError
from p2pfs.wire.frames import MAX_FRAME_BYTES, Frame, encode_frame, frame_header

MAGIC = "p2pfs"
MAX_HASHES_PER_REQUEST = 256
MAX_CHUNKS_PER_REQUEST = 256
MAX_NODES_PER_REPLY = 256
MAX_TEXT = 1024
MAX_REQUEST_ID = (1 << 64) - 1
MAX_PIECES = 1 << 24
"""16M unique chunks: ~1.2 TiB at the default chunk size, a 2 MiB bitfield."""
MAX_HAVE_UPDATE = 1024
MAX_FOLDER_MEMBERS = 64


@dataclass(frozen=True, slots=True)
class Hello:
    """First message on every stream, in both directions."""

    TAG: ClassVar[int] = 0x01
    version: int
    min_version: int
    agent: str

    def fields(self) -> list[Any]:
        return [MAGIC, self.version, self.min_version, self.agent]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> Hello:
        if not fields or fields[0] != MAGIC:
            raise WireError(ErrorCode.VERSION_UNKNOWN, "not a p2pfs peer (bad magic)")
        _need(fields, 4, "Hello")
        return cls(
            _uint(fields[1], "version", 1 << 16),
            _uint(fields[2], "min_version", 1 << 16),
            _text(fields[3], "agent", 64),
        )


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The request failed; ``request_id`` 0 means the stream as a whole."""

    TAG: ClassVar[int] = 0x02
    request_id: int
    code: ErrorCode
    message: str

    def fields(self) -> list[Any]:
        return [self.request_id, int(self.code), self.message]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> ErrorReply:
        _need(fields, 3, "Error")
        return cls(
            _request_id(fields[0]),
            ErrorCode.from_wire(_uint(fields[1], "code", 1 << 32)),
            _text(fields[2], "message", MAX_TEXT),
        )


@dataclass(frozen=True, slots=True)
class GetManifest:
    TAG: ClassVar[int] = 0x10
    request_id: int
    share_root: ContentHash

    def fields(self) -> list[Any]:
        return [self.request_id, self.share_root]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> GetManifest:
        _need(fields, 2, "GetManifest")
        return cls(_request_id(fields[0]), _hash(fields[1]))


@dataclass(frozen=True, slots=True)
class ManifestReply:
    TAG: ClassVar[int] = 0x11
    request_id: int
    manifest: bytes

    def fields(self) -> list[Any]:
        return [self.request_id, self.manifest]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> ManifestReply:
        _need(fields, 2, "ManifestReply")
        return cls(_request_id(fields[0]), _blob(fields[1], "manifest", 4096))


@dataclass(frozen=True, slots=True)
class GetNodes:
    """Tree nodes (file or directory) of a share, by hash."""

    TAG: ClassVar[int] = 0x12
    request_id: int
    share_root: ContentHash
    hashes: tuple[ContentHash, ...]

    def fields(self) -> list[Any]:
        return [self.request_id, self.share_root, list(self.hashes)]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> GetNodes:
        _need(fields, 3, "GetNodes")
        hashes = _list(fields[2], "hashes", MAX_HASHES_PER_REQUEST)
        return cls(_request_id(fields[0]), _hash(fields[1]), tuple(_hash(h) for h in hashes))


@dataclass(frozen=True, slots=True)
class NodesReply:
    """The encoded nodes, in request order (the receiver verifies each against its hash)."""

    TAG: ClassVar[int] = 0x13
    request_id: int
    nodes: tuple[bytes, ...]

    def fields(self) -> list[Any]:
        return [self.request_id, list(self.nodes)]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> NodesReply:
        _need(fields, 2, "NodesReply")
        nodes = _list(fields[1], "nodes", MAX_NODES_PER_REPLY)
        return cls(_request_id(fields[0]), tuple(_blob(n, "node", MAX_NODE_BYTES) for n in nodes))


@dataclass(frozen=True, slots=True)
class GetChunks:
    """Chunks of a share by id and length; answered by one ChunkData per chunk, in order."""

    TAG: ClassVar[int] = 0x14
    request_id: int
    share_root: ContentHash
    chunks: tuple[ChunkRef, ...]

    def fields(self) -> list[Any]:
        return [self.request_id, self.share_root, [[c.length, c.id] for c in self.chunks]]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> GetChunks:
        _need(fields, 3, "GetChunks")
        chunks = _list(fields[2], "chunks", MAX_CHUNKS_PER_REQUEST)
        return cls(
            _request_id(fields[0]),
            _hash(fields[1]),
            tuple(_chunk_ref(c) for c in chunks),
        )


@dataclass(frozen=True, slots=True)
class ChunkData:
    """Chunk ``index`` of request ``request_id``; the raw bytes follow the fields."""

    TAG: ClassVar[int] = 0x15
    request_id: int
    index: int
    payload: bytes | memoryview

    def fields(self) -> list[Any]:
        return [self.request_id, self.index]


@dataclass(frozen=True, slots=True)
class Cancel:
    """The client no longer wants the rest of a request (endgame duplicates)."""

    TAG: ClassVar[int] = 0x16
    request_id: int

    def fields(self) -> list[Any]:
        return [self.request_id]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> Cancel:
        _need(fields, 1, "Cancel")
        return cls(_request_id(fields[0]))


@dataclass(frozen=True, slots=True)
class GetHave:
    """Subscribe to the server's availability for a share: one HaveReply now, then a
    HaveUpdate whenever it gains pieces, until the client cancels or ends the stream.

    Pieces are positions in the share's list of unique chunks in tree order (directories
    depth-first by name, each file's chunks in order, a chunk counted where it first occurs).
    """

    TAG: ClassVar[int] = 0x17
    request_id: int
    share_root: ContentHash

    def fields(self) -> list[Any]:
        return [self.request_id, self.share_root]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> GetHave:
        _need(fields, 2, "GetHave")
        return cls(_request_id(fields[0]), _hash(fields[1]))


@dataclass(frozen=True, slots=True)
class HaveReply:
    """``complete``: every piece (the bitfield is then empty); else bit i (LSB-first in byte
    i // 8) says piece i is held."""

    TAG: ClassVar[int] = 0x18
    request_id: int
    piece_count: int
    complete: bool
    bitfield: bytes

    def fields(self) -> list[Any]:
        return [self.request_id, self.piece_count, self.complete, self.bitfield]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> HaveReply:
        _need(fields, 4, "HaveReply")
        count = _uint(fields[1], "piece count", MAX_PIECES)
        complete = fields[2]
        if type(complete) is not bool:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "HaveReply: complete must be bool")
        bitfield = _blob(fields[3], "bitfield", (MAX_PIECES + 7) // 8)
        if not complete and len(bitfield) != (count + 7) // 8:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "HaveReply: bitfield length")
        return cls(_request_id(fields[0]), count, complete, bitfield)

    def pieces(self) -> list[int]:
        if self.complete:
            return list(range(self.piece_count))
        return [
            index
            for index in range(self.piece_count)
            if self.bitfield[index >> 3] & (1 << (index & 7))
        ]


@dataclass(frozen=True, slots=True)
class HaveUpdate:
    TAG: ClassVar[int] = 0x19
    request_id: int
    pieces: tuple[int, ...]

    def fields(self) -> list[Any]:
        return [self.request_id, list(self.pieces)]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> HaveUpdate:
        _need(fields, 2, "HaveUpdate")
        pieces = _list(fields[1], "pieces", MAX_HAVE_UPDATE)
        return cls(_request_id(fields[0]), tuple(_uint(p, "piece", MAX_PIECES - 1) for p in pieces))


@dataclass(frozen=True, slots=True)
class FolderHello:
    """Open a sync folder on this connection: the client's nonce for the membership proof.

    Every folder id gets a FolderChallenge, known or not, so a stranger cannot even learn
    whether this node holds a folder.
    """

    TAG: ClassVar[int] = 0x20
    request_id: int
    folder_id: ContentHash
    nonce: bytes

    def fields(self) -> list[Any]:
        return [self.request_id, self.folder_id, self.nonce]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> FolderHello:
        _need(fields, 3, "FolderHello")
        return cls(_request_id(fields[0]), _hash(fields[1]), _exact(fields[2], "nonce", 32))


@dataclass(frozen=True, slots=True)
class FolderChallenge:
    """The server's nonce and its own proof of membership (checked by the client)."""

    TAG: ClassVar[int] = 0x21
    request_id: int
    nonce: bytes
    proof: bytes

    def fields(self) -> list[Any]:
        return [self.request_id, self.nonce, self.proof]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> FolderChallenge:
        _need(fields, 3, "FolderChallenge")
        return cls(
            _request_id(fields[0]), _exact(fields[1], "nonce", 32), _exact(fields[2], "proof", 32)
        )


@dataclass(frozen=True, slots=True)
class FolderProof:
    """The client's proof; a FolderWelcome grants the folder to this connection."""

    TAG: ClassVar[int] = 0x22
    request_id: int
    folder_id: ContentHash
    proof: bytes

    def fields(self) -> list[Any]:
        return [self.request_id, self.folder_id, self.proof]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> FolderProof:
        _need(fields, 3, "FolderProof")
        return cls(_request_id(fields[0]), _hash(fields[1]), _exact(fields[2], "proof", 32))


@dataclass(frozen=True, slots=True)
class FolderMember:
    node_id: bytes
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class FolderWelcome:
    """Membership granted; ``members``: other members the server knows (peer exchange)."""

    TAG: ClassVar[int] = 0x23
    request_id: int
    members: tuple[FolderMember, ...] = ()

    def fields(self) -> list[Any]:
        return [self.request_id, [[m.node_id, m.host, m.port] for m in self.members]]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> FolderWelcome:
        _need(fields, 2, "FolderWelcome")
        members = []
        for item in _list(fields[1], "members", MAX_FOLDER_MEMBERS):
            entry = _list(item, "member", 3)
            _need(entry, 3, "member")
            members.append(
                FolderMember(
                    _exact(entry[0], "member node id", 32),
                    _text(entry[1], "member host", 64),
                    _uint(entry[2], "member port", 65535),
                )
            )
        return cls(_request_id(fields[0]), tuple(members))


@dataclass(frozen=True, slots=True)
class WatchFolder:
    """Subscribe to the server's folder index root: one FolderRoot now and one on every
    change, until the client cancels or ends the stream (nothing may follow it)."""

    TAG: ClassVar[int] = 0x24
    request_id: int
    folder_id: ContentHash

    def fields(self) -> list[Any]:
        return [self.request_id, self.folder_id]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> WatchFolder:
        _need(fields, 2, "WatchFolder")
        return cls(_request_id(fields[0]), _hash(fields[1]))


@dataclass(frozen=True, slots=True)
class FolderRoot:
    """The index root (hash and record count; an all-zero hash with count 0 is empty)."""

    TAG: ClassVar[int] = 0x25
    request_id: int
    root: ContentHash
    records: int

    def fields(self) -> list[Any]:
        return [self.request_id, self.root, self.records]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> FolderRoot:
        _need(fields, 3, "FolderRoot")
        return cls(_request_id(fields[0]), _hash(fields[1]), _uint(fields[2], "records", 1 << 40))


def bitfield_of(pieces: Iterable[int], piece_count: int) -> bytes:
    field = bytearray((piece_count + 7) // 8)
    for index in pieces:
        field[index >> 3] |= 1 << (index & 7)
    return bytes(field)


Message = (
    Hello
    | ErrorReply
    | GetManifest
    | ManifestReply
    | GetNodes
    | NodesReply
    | GetChunks
    | ChunkData
    | Cancel
    | GetHave
    | HaveReply
    | HaveUpdate
    | FolderHello
    | FolderChallenge
    | FolderProof
    | FolderWelcome
    | WatchFolder
    | FolderRoot
)
_FIELD_DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    cls.TAG: cls.from_fields_untrusted
    for cls in (
        Hello,
        ErrorReply,
        GetManifest,
        ManifestReply,
        GetNodes,
        NodesReply,
        GetChunks,
        Cancel,
        GetHave,
        HaveReply,
        HaveUpdate,
        FolderHello,
        FolderChallenge,
        FolderProof,
        FolderWelcome,
        WatchFolder,
        FolderRoot,
    )
}
RESERVED_TAGS = frozenset({0x00, 0xFF})
"""Never assigned: 0x00 catches zeroed buffers, 0xFF is kept for an extension escape."""


def encode_message(message: Message) -> bytes:
    """One whole frame."""
    header: bytes = msgpack.packb(message.fields(), use_bin_type=True)
    if isinstance(message, ChunkData):
        return (
            frame_header(ChunkData.TAG, len(header) + len(message.payload))
            + header
            + bytes(message.payload)
        )
    return encode_frame(message.TAG, header)


def encode_chunk_data_header(request_id: int, index: int, payload_length: int) -> bytes:
    """Frame header and fields of a ChunkData; the caller writes the payload after it."""
    fields: bytes = msgpack.packb([request_id, index], use_bin_type=True)
    return frame_header(ChunkData.TAG, len(fields) + payload_length) + fields


def decode_message_untrusted(frame: Frame) -> Message:
    """Parse one frame's message; every defect raises WireError with its code."""
    if frame.tag == ChunkData.TAG:
        fields, end = _unpack_fields(frame.body, allow_payload=True)
        _need(fields, 2, "ChunkData")
        payload = frame.body[end:]
        if len(payload) > MAX_CHUNK_LENGTH:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "chunk payload too large")
        return ChunkData(
            _request_id(fields[0]), _uint(fields[1], "index", MAX_CHUNKS_PER_REQUEST - 1), payload
        )
    decoder = _FIELD_DECODERS.get(frame.tag)
    if decoder is None:
        raise WireError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message tag 0x{frame.tag:02x}")
    fields, _ = _unpack_fields(frame.body, allow_payload=False)
    return decoder(fields)


def _unpack_fields(body: memoryview, allow_payload: bool) -> tuple[list[Any], int]:
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_buffer_size=MAX_FRAME_BYTES,
        max_bin_len=MAX_FRAME_BYTES,
        max_str_len=MAX_TEXT * 4,
        max_array_len=max(MAX_HASHES_PER_REQUEST, MAX_CHUNKS_PER_REQUEST, MAX_HAVE_UPDATE),
        max_map_len=64,
        max_ext_len=0,
    )
    if allow_payload:
        # Only the small header array is parsed; the payload is never fed to msgpack.
        unpacker.feed(body[:64])
    else:
        unpacker.feed(body)
    try:
        fields = unpacker.unpack()
    except msgpack.OutOfData as exc:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, "truncated message fields") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, f"malformed message fields: {exc}") from exc
    end = unpacker.tell()
    if not isinstance(fields, list):
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, "message fields must be an array")
    if not allow_payload and end != len(body):
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, "trailing bytes after message")
    return fields, end


def _need(fields: list[Any], count: int, name: str) -> None:
    if len(fields) < count:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, f"{name}: expected {count} fields")


def _uint(value: object, name: str, bound: int) -> int:
    if type(value) is not int or not 0 <= value <= bound:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, f"{name}: bad value {value!r}")
    return value


def _request_id(value: object) -> int:
    return _uint(value, "request id", MAX_REQUEST_ID)


def _text(value: object, name: str, bound: int) -> str:
    if not isinstance(value, str) or len(value) > bound:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, f"{name}: expected text <= {bound}")
    return value


def _blob(value: object, name: str, bound: int) -> bytes:
    if not isinstance(value, bytes) or len(value) > bound:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, f"{name}: expected bytes <= {bound}")
    return value


def _exact(value: object, name: str, length: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, f"{name}: expected {length} bytes")
    return value


def _list(value: object, name: str, bound: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > bound:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, f"{name}: expected a list <= {bound}")
    return value


def _hash(value: object) -> ContentHash:
    try:
        return content_hash_untrusted(value)
    except RemoteProtocolError as exc:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, str(exc)) from exc


_CHUNK_LEAF = ChunkLeafCodec()


def _chunk_ref(value: object) -> ChunkRef:
    try:
        return _CHUNK_LEAF.leaf_from_wire_untrusted(value)
    except RemoteProtocolError as exc:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, str(exc)) from exc
