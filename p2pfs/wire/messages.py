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
MAX_TREE_BUDGET = 1 << 30
"""The largest GetTree budget a request may name (a server pushes at most its own cap)."""


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
class GetTree:
    """A share's tree nodes, pushed without being named: the directory trees (and, if
    ``file_trees``, the file trees) below the manifest's root, breadth first, until their
    encodings would pass ``budget`` bytes. Answered by TreeNodes frames, the last one
    marked; the client walks its trees as before and asks GetNodes only for what did not
    come. A listing asks for directory trees alone."""

    TAG: ClassVar[int] = 0x1A
    request_id: int
    share_root: ContentHash
    budget: int
    file_trees: bool

    def fields(self) -> list[Any]:
        return [self.request_id, self.share_root, self.budget, self.file_trees]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> GetTree:
        _need(fields, 4, "GetTree")
        file_trees = fields[3]
        if type(file_trees) is not bool:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "GetTree: file_trees must be bool")
        budget = _uint(fields[2], "budget", MAX_TREE_BUDGET)
        return cls(_request_id(fields[0]), _hash(fields[1]), budget, file_trees)


@dataclass(frozen=True, slots=True)
class TreeNodes:
    """Nodes for a GetTree, directory-tree and file-tree nodes apart (each is hashed with
    its own tree's key); ``last``: the answer is complete. Unnamed by the request, each
    node counts against the request's budget and is verified when a walk reaches it."""

    TAG: ClassVar[int] = 0x1B
    request_id: int
    dir_nodes: tuple[bytes, ...]
    file_nodes: tuple[bytes, ...]
    last: bool

    def fields(self) -> list[Any]:
        return [self.request_id, list(self.dir_nodes), list(self.file_nodes), self.last]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> TreeNodes:
        _need(fields, 4, "TreeNodes")
        dirs = _list(fields[1], "dir_nodes", MAX_NODES_PER_REPLY)
        files = _list(fields[2], "file_nodes", MAX_NODES_PER_REPLY - len(dirs))
        last = fields[3]
        if type(last) is not bool:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "TreeNodes: last must be bool")
        return cls(
            _request_id(fields[0]),
            tuple(_blob(n, "node", MAX_NODE_BYTES) for n in dirs),
            tuple(_blob(n, "node", MAX_NODE_BYTES) for n in files),
            last,
        )

    @property
    def size(self) -> int:
        """The bytes of its nodes (what counts against the budget)."""
        return sum(map(len, self.dir_nodes)) + sum(map(len, self.file_nodes))


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
    """Membership granted; ``members``: other members the server knows (peer exchange);
    ``device``: the server's device id in this folder (appended field, absent from older
    peers), so members can tell whose conflict copy is whose."""

    TAG: ClassVar[int] = 0x23
    request_id: int
    members: tuple[FolderMember, ...] = ()
    device: bytes | None = None

    def fields(self) -> list[Any]:
        fields: list[Any] = [
            self.request_id,
            [[m.node_id, m.host, m.port] for m in self.members],
        ]
        if self.device is not None:
            fields.append(self.device)
        return fields

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
        device = _exact(fields[2], "device", 32) if len(fields) > 2 else None
        return cls(_request_id(fields[0]), tuple(members), device)


@dataclass(frozen=True, slots=True)
class WatchFolder:
    """Subscribe to the server's folder index root: one FolderRoot now and one on every
    change, until the client cancels or ends the stream (nothing may follow it)."""

    TAG: ClassVar[int] = 0x24
    request_id: int
    folder_id: ContentHash
    push_budget: int = 0
    """Appended field (absent from older peers, read as 0): node bytes the client takes
    pushed after each FolderRoot (FolderNodes); 0 asks for no push."""
    placing: bool = False
    """Appended after the budget (absent from older peers, read as false): the client takes
    FolderPlacing between the server's roots (what the server is placing now)."""

    def fields(self) -> list[Any]:
        if self.placing:
            return [self.request_id, self.folder_id, self.push_budget, True]
        if self.push_budget:
            return [self.request_id, self.folder_id, self.push_budget]
        return [self.request_id, self.folder_id]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> WatchFolder:
        _need(fields, 2, "WatchFolder")
        budget = _uint(fields[2], "push_budget", MAX_TREE_BUDGET) if len(fields) > 2 else 0
        placing = False
        if len(fields) > 3:
            placing = fields[3]
            if type(placing) is not bool:
                raise WireError(ErrorCode.PROTOCOL_VIOLATION, "WatchFolder: placing must be bool")
        return cls(_request_id(fields[0]), _hash(fields[1]), budget, placing)


MAX_NEED = 1 << 48
"""Bound of each FolderNeed count (items or bytes): far above any real folder."""
ROOT_SIGNATURE_LEN = 64
"""An Ed25519 signature (FolderRoot's root signature)."""


@dataclass(frozen=True, slots=True)
class FolderNeed:
    """A member's own account of its sync: files (``items``) and bytes it still has to
    fetch, out of the folder's live files as it knows them (``global_*``)."""

    items: int
    bytes: int
    global_items: int
    global_bytes: int

    @property
    def percent(self) -> float:
        """Completion by bytes, as Syncthing shows it (by files when all are empty); never
        100 while anything is needed, never below 0 whatever a peer says."""
        if self.items == 0 and self.bytes == 0:
            return 100.0
        if self.global_bytes > 0:
            share = 100.0 * (1.0 - self.bytes / self.global_bytes)
        elif self.global_items > 0:  # empty files only: by count
            share = 100.0 * (1.0 - self.items / self.global_items)
        else:
            share = 0.0
        return round(min(max(share, 0.0), 99.9), 1)

    def as_dict(self) -> dict[str, int | float]:
        return {
            "need_items": self.items,
            "need_bytes": self.bytes,
            "global_items": self.global_items,
            "global_bytes": self.global_bytes,
            "percent": self.percent,
        }


@dataclass(frozen=True, slots=True)
class FolderRoot:
    """The index root (hash and record count; an all-zero hash with count 0 is empty), and
    the server's own need (appended fields, absent from older peers): sent again when only
    the need changes, at most once per PROGRESS_INTERVAL. A read-write server appends the
    folder write key's signature over the root (``sync/records.py``: ``root_statement``):
    its records are then vouched for by the tree, not each by its own signature."""

    TAG: ClassVar[int] = 0x25
    request_id: int
    root: ContentHash
    records: int
    need: FolderNeed | None = None
    root_signature: bytes | None = None

    def fields(self) -> list[Any]:
        fields: list[Any] = [self.request_id, self.root, self.records]
        if self.need is not None:
            need = self.need
            fields += [need.items, need.bytes, need.global_items, need.global_bytes]
            if self.root_signature is not None:
                fields.append(self.root_signature)
        return fields

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> FolderRoot:
        _need(fields, 3, "FolderRoot")
        need = None
        signature = None
        if len(fields) > 3:
            _need(fields, 7, "FolderRoot need")
            counts = [
                _uint(fields[3 + i], name, MAX_NEED)
                for i, name in enumerate(
                    ("need items", "need bytes", "global items", "global bytes")
                )
            ]
            need = FolderNeed(*counts)
            if len(fields) > 7:
                signature = _exact(fields[7], "FolderRoot root signature", ROOT_SIGNATURE_LEN)
        return cls(
            _request_id(fields[0]),
            _hash(fields[1]),
            _uint(fields[2], "records", 1 << 40),
            need,
            signature,
        )


@dataclass(frozen=True, slots=True)
class FolderNodes:
    """What the client of a WatchFolder that asked for a push will want after the FolderRoot
    before it: the index nodes a member holding the server's previous root would ask for
    (all of them from the top, after the first root), the records at their changed leaves,
    and those records' file trees, each list of its own kind (hashed with its own key),
    until the next would pass the push budget. ``last``: the push for that root is
    complete. Unnamed by any request: the client keys each by the hash it computes and
    verifies it where it is used, as a node it asked for."""

    TAG: ClassVar[int] = 0x26
    request_id: int
    index_nodes: tuple[bytes, ...]
    records: tuple[bytes, ...]
    file_nodes: tuple[bytes, ...]
    last: bool

    def fields(self) -> list[Any]:
        return [
            self.request_id,
            list(self.index_nodes),
            list(self.records),
            list(self.file_nodes),
            self.last,
        ]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> FolderNodes:
        _need(fields, 5, "FolderNodes")
        index = _list(fields[1], "index_nodes", MAX_NODES_PER_REPLY)
        records = _list(fields[2], "records", MAX_NODES_PER_REPLY - len(index))
        files = _list(fields[3], "file_nodes", MAX_NODES_PER_REPLY - len(index) - len(records))
        last = fields[4]
        if type(last) is not bool:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "FolderNodes: last must be bool")
        return cls(
            _request_id(fields[0]),
            tuple(_blob(n, "index node", MAX_NODE_BYTES) for n in index),
            tuple(_blob(n, "record", MAX_NODE_BYTES) for n in records),
            tuple(_blob(n, "file node", MAX_NODE_BYTES) for n in files),
            last,
        )

    @property
    def size(self) -> int:
        """The bytes of its nodes and records (what counts against the budget)."""
        return (
            sum(map(len, self.index_nodes))
            + sum(map(len, self.records))
            + sum(map(len, self.file_nodes))
        )

    @property
    def empty(self) -> bool:
        return not (self.index_nodes or self.records or self.file_nodes)


MAX_PLACING_IDS = 1024
"""Chunk ids in one FolderPlacing frame (a sender splits a longer run)."""
MAX_PLACING_HELD = 1 << 20
"""Bound of a FolderPlacing's position: chunks one placement may tell of (a receiver holds
an entry for each)."""


@dataclass(frozen=True, slots=True)
class FolderPlacing:
    """What the server is placing now (to a WatchFolder that asked, between its roots):
    the index root it is taking, and chunk ids it holds verified toward it in files not
    yet committed, which GetChunks on the folder may ask for. ``start`` is the position of
    the first id in the server's list for that root: 0 begins a new list (a new root, or
    the same root placed again); each later frame continues the last one. An all-zero
    root with no ids says it places nothing now."""

    TAG: ClassVar[int] = 0x27
    request_id: int
    root: ContentHash
    start: int
    chunk_ids: tuple[bytes, ...]

    def fields(self) -> list[Any]:
        return [self.request_id, self.root, self.start, list(self.chunk_ids)]

    @classmethod
    def from_fields_untrusted(cls, fields: list[Any]) -> FolderPlacing:
        _need(fields, 4, "FolderPlacing")
        ids = _list(fields[3], "chunk ids", MAX_PLACING_IDS)
        return cls(
            _request_id(fields[0]),
            _hash(fields[1]),
            _uint(fields[2], "start", MAX_PLACING_HELD),
            tuple(_exact(chunk_id, "chunk id", 32) for chunk_id in ids),
        )


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
    | GetTree
    | TreeNodes
    | FolderHello
    | FolderChallenge
    | FolderProof
    | FolderWelcome
    | WatchFolder
    | FolderRoot
    | FolderNodes
    | FolderPlacing
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
        GetTree,
        TreeNodes,
        FolderHello,
        FolderChallenge,
        FolderProof,
        FolderWelcome,
        WatchFolder,
        FolderRoot,
        FolderNodes,
        FolderPlacing,
    )
}
RESERVED_TAGS = frozenset({0x00, 0xFF})
"""Never assigned: 0x00 catches zeroed buffers, 0xFF is kept for an extension escape."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one message type may cost a receiver, derived from its schema.

    ``frame``: the largest frame (tag + body) an honest sender produces, with room for
    appended fields; ``objects`` / ``depth``: msgpack objects and nesting in its fields
    (checked before msgpack builds anything, so a frame of nested empty arrays costs a scan
    of at most ``objects`` bytes, not a gigabyte of lists).
    """

    frame: int
    objects: int
    depth: int


# Later versions may append fields: every bound leaves room for a few small ones.
_EXTRA_OBJECTS = 16
_SMALL_FRAME = 1024
_HASH_BYTES = 2 + 32  # msgpack bin8 header + hash
_UINT_BYTES = 9  # msgpack uint64


def _bounds(frame: int, objects: int, depth: int) -> Bounds:
    # Twice the schema's size: a list one item too long is then refused by the field check
    # (PROTOCOL_VIOLATION) rather than by the frame bound, and appended fields fit.
    size = min(2 * max(frame, _SMALL_FRAME) + 64, MAX_FRAME_BYTES)
    return Bounds(size, objects + _EXTRA_OBJECTS, depth + 1)


BOUNDS: dict[int, Bounds] = {
    Hello.TAG: _bounds(0, 4, 1),
    ErrorReply.TAG: _bounds(MAX_TEXT * 4 + 2 * _UINT_BYTES, 3, 1),
    GetManifest.TAG: _bounds(0, 2, 1),
    ManifestReply.TAG: _bounds(4096, 2, 1),
    GetNodes.TAG: _bounds(MAX_HASHES_PER_REQUEST * _HASH_BYTES, 3 + MAX_HASHES_PER_REQUEST, 2),
    NodesReply.TAG: _bounds(MAX_NODES_PER_REPLY * (MAX_NODE_BYTES + 5), 2 + MAX_NODES_PER_REPLY, 2),
    GetChunks.TAG: _bounds(
        MAX_CHUNKS_PER_REQUEST * (1 + _UINT_BYTES + _HASH_BYTES), 3 + 3 * MAX_CHUNKS_PER_REQUEST, 3
    ),
    ChunkData.TAG: Bounds(MAX_FRAME_BYTES, 2 + _EXTRA_OBJECTS, 2),
    Cancel.TAG: _bounds(0, 1, 1),
    GetHave.TAG: _bounds(0, 2, 1),
    HaveReply.TAG: _bounds((MAX_PIECES + 7) // 8 + 32, 4, 1),
    HaveUpdate.TAG: _bounds(MAX_HAVE_UPDATE * _UINT_BYTES, 2 + MAX_HAVE_UPDATE, 2),
    GetTree.TAG: _bounds(0, 4, 1),
    TreeNodes.TAG: _bounds(MAX_NODES_PER_REPLY * (MAX_NODE_BYTES + 5), 4 + MAX_NODES_PER_REPLY, 2),
    FolderHello.TAG: _bounds(0, 3, 1),
    FolderChallenge.TAG: _bounds(0, 3, 1),
    FolderProof.TAG: _bounds(0, 3, 1),
    FolderWelcome.TAG: _bounds(
        MAX_FOLDER_MEMBERS * 128 + _HASH_BYTES, 3 + 4 * MAX_FOLDER_MEMBERS, 3
    ),
    WatchFolder.TAG: _bounds(0, 4, 1),
    FolderRoot.TAG: _bounds(0, 7, 1),
    FolderNodes.TAG: _bounds(
        MAX_NODES_PER_REPLY * (MAX_NODE_BYTES + 5), 5 + MAX_NODES_PER_REPLY, 2
    ),
    FolderPlacing.TAG: _bounds(_HASH_BYTES + MAX_PLACING_IDS * _HASH_BYTES, 4 + MAX_PLACING_IDS, 2),
}
"""Per message tag; a tag missing here is unknown to this version."""

REQUEST_TYPES = (
    GetManifest,
    GetNodes,
    GetChunks,
    GetHave,
    GetTree,
    FolderHello,
    FolderProof,
    WatchFolder,
)
"""The requests a client sends (each answered by the server), Cancel aside."""
REQUEST_TAGS = frozenset(cls.TAG for cls in REQUEST_TYPES) | {Cancel.TAG}
"""What a client may send after its Hello (Cancel included)."""
REPLY_TAGS = frozenset(BOUNDS) - REQUEST_TAGS - {Hello.TAG}


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
    bounds = BOUNDS.get(frame.tag)
    if bounds is None:
        raise WireError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message tag 0x{frame.tag:02x}")
    if len(frame.body) + 1 > bounds.frame:
        raise WireError(ErrorCode.FRAME_TOO_LARGE, f"{len(frame.body)}-byte body for its tag")
    if frame.tag == ChunkData.TAG:
        return _chunk_data_fast_untrusted(frame.body) or _chunk_data_untrusted(frame.body)
    decoder = _FIELD_DECODERS[frame.tag]
    fields, _ = _unpack_fields(frame.body, bounds, allow_payload=False)
    return decoder(fields)


def _chunk_data_untrusted(body: memoryview) -> ChunkData:
    fields, end = _unpack_fields(body, BOUNDS[ChunkData.TAG], allow_payload=True)
    _need(fields, 2, "ChunkData")
    payload = body[end:]
    if len(payload) > MAX_CHUNK_LENGTH:
        raise WireError(ErrorCode.PROTOCOL_VIOLATION, "chunk payload too large")
    return ChunkData(
        _request_id(fields[0]), _uint(fields[1], "index", MAX_CHUNKS_PER_REQUEST - 1), payload
    )


# msgpack first bytes of the unsigned encodings -> bytes that follow (positive fixints,
# 0x00-0x7f, carry their value in the first byte).
_UINT_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _chunk_data_fast_untrusted(body: memoryview) -> ChunkData | None:
    """A ChunkData whose fields are the usual ``[request id, index]`` in msgpack's unsigned
    encodings, read without building an unpacker; None for anything else, which the
    general path then accepts or refuses. It returns only what the general path would:
    the same two values, the same bounds (a test holds the two paths to it). The general
    path costs ~4 us a chunk (a msgpack Unpacker with its limits, the shape walk), which
    10,000 small files pay 11,228 times on one thread."""
    if len(body) < 3 or body[0] != 0x92:
        return None
    values = []
    pos = 1
    for _ in range(2):
        if pos >= len(body):
            return None
        first = body[pos]
        if first < 0x80:
            values.append(first)
            pos += 1
            continue
        width = _UINT_WIDTHS.get(first)
        if width is None or pos + 1 + width > len(body):
            return None
        values.append(int.from_bytes(body[pos + 1 : pos + 1 + width], "big"))
        pos += 1 + width
    request_id, index = values
    if index >= MAX_CHUNKS_PER_REQUEST or len(body) - pos > MAX_CHUNK_LENGTH:
        return None
    return ChunkData(request_id, index, body[pos:])


def _unpack_fields(body: memoryview, bounds: Bounds, allow_payload: bool) -> tuple[list[Any], int]:
    # Only a ChunkData's small header array is parsed; its payload never reaches msgpack.
    data = body[:64] if allow_payload else body
    _check_shape_untrusted(data, bounds)
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_buffer_size=max(len(data), 1),
        max_bin_len=bounds.frame,
        max_str_len=MAX_TEXT * 4,
        max_array_len=bounds.objects,
        max_map_len=bounds.objects // 2,
        max_ext_len=0,
    )
    unpacker.feed(data)
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


# msgpack first bytes of fixed-size scalars -> bytes that follow them.
_SCALAR_SIZES = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,  # nil, false, true
    0xCA: 4, 0xCB: 8,  # float32, float64
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,  # uint8..64
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,  # int8..64
}  # fmt: skip
# First bytes of str / bin with an n-byte length -> n.
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
# First bytes of array / map with an n-byte count -> (n, items per count).
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def _check_shape_untrusted(data: memoryview | bytes, bounds: Bounds) -> None:
    """Walk the first msgpack object's skeleton without building it: at most
    ``bounds.objects`` objects nested at most ``bounds.depth`` deep, else WireError.

    The walk stops at the first object over the bound, so its cost is bounded by the
    schema, never by what the peer declares.
    """
    size = len(data)
    pos = 0
    objects = 0
    left = [1]  # items still to read at each open nesting level
    while left:
        if not left[-1]:
            left.pop()
            continue
        left[-1] -= 1
        if pos >= size:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "truncated message fields")
        objects += 1
        if objects > bounds.objects:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "too many objects in message fields")
        first = data[pos]
        pos += 1
        count = -1
        if first <= 0x7F or first >= 0xE0:  # fixint
            continue
        if first <= 0x8F:  # fixmap
            count = 2 * (first & 0x0F)
        elif first <= 0x9F:  # fixarray
            count = first & 0x0F
        elif first <= 0xBF:  # fixstr
            pos += first & 0x1F
        elif first in _SCALAR_SIZES:
            pos += _SCALAR_SIZES[first]
        elif first in _SIZED:
            width = _SIZED[first]
            pos += width + int.from_bytes(data[pos : pos + width], "big")
        elif first in _CONTAINERS:
            width, per = _CONTAINERS[first]
            count = per * int.from_bytes(data[pos : pos + width], "big")
            pos += width
        else:  # extension types, and 0xC1, which msgpack never uses
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, f"msgpack type 0x{first:02x}")
        if count >= 0:
            if len(left) > bounds.depth:
                raise WireError(ErrorCode.PROTOCOL_VIOLATION, "message fields nested too deep")
            left.append(count)


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
