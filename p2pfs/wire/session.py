"""Per-stream protocol state (sans-I/O): ``receive_data`` / ``next_message`` / ``send``.

Every stream starts with a Hello in each direction, then the client sends requests and the
server answers them in order; a client may pipeline many requests on one stream. The session
enforces who may send what, version compatibility, increasing request ids, and that every
reply answers an outstanding request (so a peer cannot inject chunks nobody asked for).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from p2pfs.errors import LocalProtocolError
from p2pfs.wire.codes import ErrorCode, WireError
from p2pfs.wire.frames import FrameDecoder
from p2pfs.wire.messages import (
    BOUNDS,
    REPLY_TAGS,
    REQUEST_TAGS,
    REQUEST_TYPES,
    Cancel,
    ChunkData,
    ErrorReply,
    FolderChallenge,
    FolderHello,
    FolderNodes,
    FolderPlacing,
    FolderProof,
    FolderRoot,
    FolderWelcome,
    GetChunks,
    GetHave,
    GetManifest,
    GetNodes,
    GetTree,
    HaveReply,
    HaveUpdate,
    Hello,
    ManifestReply,
    Message,
    NodesReply,
    TreeNodes,
    WatchFolder,
    decode_message_untrusted,
    encode_message,
)

PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1
FOLDER_PUSH_VERSION = 2
"""From this version on a server pushes FolderNodes after each FolderRoot of a WatchFolder
that asked for them; an older one ignores the request's push budget."""
AGENT = "p2pfs/0.1"
FRAME_DEADLINE = 10.0
"""Seconds a frame's bytes may stop coming before it is overdue."""
FRAME_MIN_RATE = 1024
"""Bytes per second a frame must average, after its first FRAME_DEADLINE seconds. Its
bytes share the path with the other streams' frames: at 64 KiB/s (until session 39) a
fetch over a 600 ms round trip with 3% loss (~16 KB/s for the whole connection, four
streams) had every chunk reply reset as unfinished and never finished."""

Request = (
    GetManifest | GetNodes | GetChunks | GetHave | GetTree | FolderHello | FolderProof | WatchFolder
)
Reply = (
    ManifestReply
    | NodesReply
    | TreeNodes
    | ChunkData
    | ErrorReply
    | HaveReply
    | HaveUpdate
    | FolderChallenge
    | FolderWelcome
    | FolderRoot
    | FolderNodes
    | FolderPlacing
)
_SUBSCRIPTIONS = (GetHave, WatchFolder)
_REPLY_TYPES = (
    ManifestReply,
    NodesReply,
    TreeNodes,
    ChunkData,
    ErrorReply,
    HaveReply,
    HaveUpdate,
    FolderChallenge,
    FolderWelcome,
    FolderRoot,
    FolderNodes,
    FolderPlacing,
)
_EXPECTED_REPLY: dict[type, type] = {
    GetManifest: ManifestReply,
    GetNodes: NodesReply,
    GetChunks: ChunkData,
    GetTree: TreeNodes,
    FolderHello: FolderChallenge,
    FolderProof: FolderWelcome,
}


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(slots=True)
class _Outstanding:
    request: Request
    chunks_left: int
    piece_count: int = 0
    budget_left: int = 0
    """GetTree: node bytes the server may still push; WatchFolder: those of the open push."""
    push_open: bool = False
    """WatchFolder with a push budget: a FolderRoot came, its last FolderNodes not yet."""


class StreamSession:
    """One stream's protocol state for one side."""

    def __init__(
        self,
        role: Role,
        version: int = PROTOCOL_VERSION,
        frame_deadline: float | None = None,
    ) -> None:
        """``frame_deadline``: None for FRAME_DEADLINE (read here, so a test's daemon may
        shorten it)."""
        self.role = role
        self._frame_deadline = FRAME_DEADLINE if frame_deadline is None else frame_deadline
        self._version = version
        self._decoder = FrameDecoder(limit_for=self._frame_limit_untrusted)
        self.peer_hello: Hello | None = None
        self.version: int | None = None
        """The version both sides speak, once the peer's Hello arrived."""
        self._last_request_id = 0
        self._outstanding: dict[int, _Outstanding] = {}
        self._subscribed = False
        """A GetHave is open on this stream: its updates never end, so nothing may follow."""

    # -- output ---------------------------------------------------------------------------

    def hello(self) -> bytes:
        return encode_message(Hello(self._version, MIN_PROTOCOL_VERSION, AGENT))

    def send(self, message: Message) -> bytes:
        """Encode ``message`` after checking that this side may send it now."""
        if isinstance(message, Hello):
            raise LocalProtocolError("use hello()")
        if self.role is Role.CLIENT:
            if isinstance(message, REQUEST_TYPES):
                if self._subscribed:
                    raise LocalProtocolError("nothing may follow a subscription on its stream")
                self._subscribed = isinstance(message, _SUBSCRIPTIONS)
                if message.request_id <= self._last_request_id:
                    raise LocalProtocolError("request ids must increase")
                self._last_request_id = message.request_id
                expected = len(message.chunks) if isinstance(message, GetChunks) else 1
                budget = message.budget if isinstance(message, GetTree) else 0
                self._outstanding[message.request_id] = _Outstanding(message, expected, 0, budget)
            elif not isinstance(message, Cancel):
                raise LocalProtocolError(f"a client does not send {type(message).__name__}")
        elif not isinstance(message, _REPLY_TYPES):
            raise LocalProtocolError(f"a server does not send {type(message).__name__}")
        return encode_message(message)

    def outstanding(self, request_id: int) -> Request | None:
        entry = self._outstanding.get(request_id)
        return entry.request if entry else None

    @property
    def outstanding_count(self) -> int:
        return len(self._outstanding)

    @property
    def push_open(self) -> bool:
        """A WatchFolder's push is under way: FolderNodes are due before the next root."""
        return any(entry.push_open for entry in self._outstanding.values())

    # -- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float = 0.0) -> None:
        """Buffer the peer's bytes; ``now`` (any clock) starts a new frame's deadline."""
        self._decoder.feed(data, now)

    def frame_deadline(self) -> float | None:
        """When the peer's unfinished frame is overdue (same clock as ``now``), or None.

        Overdue when none of its bytes came for ``frame_deadline`` seconds, or when it has
        taken ``frame_deadline`` plus its declared size at FRAME_MIN_RATE: a peer cannot
        hold a half-sent frame (and its buffer) forever, while a slow path's frames, still
        arriving, finish.
        """
        decoder = self._decoder
        since = decoder.unfinished_since
        if since is None:
            return None
        total = since + self._frame_deadline + decoder.pending_frame_length / FRAME_MIN_RATE
        return min(decoder.last_fed + self._frame_deadline, total)

    def _frame_limit_untrusted(self, tag: int) -> int:
        """The largest frame the peer may send with ``tag`` now (WireError if none).

        Decided from the five header bytes, before the body is buffered: before the Hello
        only a Hello, then requests to a server (a few KiB) and replies to a client.
        """
        bounds = BOUNDS.get(tag)
        if bounds is None:
            raise WireError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message tag 0x{tag:02x}")
        if self.peer_hello is None:
            allowed = tag == Hello.TAG
        elif self.role is Role.SERVER:
            allowed = tag in REQUEST_TAGS
        else:
            allowed = tag in REPLY_TAGS
        if not allowed:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, f"message tag 0x{tag:02x} not allowed")
        return bounds.frame

    def next_message(self) -> Message | None:
        """The next message from the peer, or None until more data arrives."""
        frame = self._decoder.next_frame_untrusted()
        if frame is None:
            return None
        message = decode_message_untrusted(frame)
        if self.peer_hello is None:
            if not isinstance(message, Hello):
                raise WireError(ErrorCode.PROTOCOL_VIOLATION, "stream must start with Hello")
            self._accept_hello(message)
            return message
        if isinstance(message, Hello):
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "second Hello")
        if self.role is Role.SERVER:
            self._check_request(message)
        else:
            self._check_reply(message)
        return message

    def _accept_hello(self, hello: Hello) -> None:
        if hello.version < MIN_PROTOCOL_VERSION:
            raise WireError(
                ErrorCode.VERSION_TOO_OLD,
                f"peer speaks version {hello.version}, oldest supported {MIN_PROTOCOL_VERSION}",
            )
        if hello.min_version > self._version:
            raise WireError(
                ErrorCode.VERSION_UNKNOWN,
                f"peer needs version >= {hello.min_version}, we speak {self._version}",
            )
        self.peer_hello = hello
        self.version = min(hello.version, self._version)

    def _check_request(self, message: Message) -> None:
        if isinstance(message, Cancel):
            return
        if not isinstance(message, REQUEST_TYPES):
            raise WireError(
                ErrorCode.PROTOCOL_VIOLATION, f"a client may not send {type(message).__name__}"
            )
        if self._subscribed:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "a request after a subscription")
        self._subscribed = isinstance(message, _SUBSCRIPTIONS)
        if message.request_id <= self._last_request_id:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "request ids must increase")
        self._last_request_id = message.request_id

    def _check_reply(self, message: Message) -> None:
        if type(message) is ChunkData:
            # The one reply that comes by the thousand: checked here in a few steps, the
            # same checks as below (which any other case still goes through).
            entry = self._outstanding.get(message.request_id)
            if entry is not None and type(entry.request) is GetChunks:
                self._check_chunk(message, entry.request, entry)
                if not entry.chunks_left:
                    del self._outstanding[message.request_id]
                return
        if not isinstance(message, _REPLY_TYPES):
            raise WireError(
                ErrorCode.PROTOCOL_VIOLATION, f"a server may not send {type(message).__name__}"
            )
        if isinstance(message, ErrorReply) and message.request_id == 0:
            return  # about the whole stream
        entry = self._outstanding.get(message.request_id)
        if entry is None:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "reply to no outstanding request")
        request = entry.request
        if isinstance(message, ErrorReply):
            del self._outstanding[message.request_id]
            return
        if isinstance(request, GetHave):
            self._check_have(message, entry)
            return
        if isinstance(request, WatchFolder):
            self._check_watch(message, request, entry)
            return  # open-ended: one FolderRoot per change
        if not isinstance(message, _EXPECTED_REPLY[type(request)]):
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "reply does not match its request")
        if isinstance(message, NodesReply):
            assert isinstance(request, GetNodes)
            if len(message.nodes) != len(request.hashes):
                raise WireError(ErrorCode.PROTOCOL_VIOLATION, "wrong number of nodes")
        if isinstance(message, TreeNodes):
            entry.budget_left -= message.size
            if entry.budget_left < 0:
                raise WireError(ErrorCode.PROTOCOL_VIOLATION, "tree nodes beyond the budget")
            if not message.last:
                if not message.dir_nodes and not message.file_nodes:
                    # Each frame before the last brings a node: the budget bounds them.
                    raise WireError(ErrorCode.PROTOCOL_VIOLATION, "an empty TreeNodes not last")
                return
        if isinstance(message, ChunkData):
            assert isinstance(request, GetChunks)
            self._check_chunk(message, request, entry)
            if entry.chunks_left:
                return
        del self._outstanding[message.request_id]

    @staticmethod
    def _check_chunk(message: ChunkData, request: GetChunks, entry: _Outstanding) -> None:
        expected_index = len(request.chunks) - entry.chunks_left
        if message.index != expected_index:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "chunk out of order")
        if len(message.payload) != request.chunks[message.index].length:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "chunk of the wrong length")
        entry.chunks_left -= 1

    def _check_watch(self, message: Message, request: WatchFolder, entry: _Outstanding) -> None:
        """FolderRoot per change; with a push budget each is followed by FolderNodes frames
        within the budget, every one before the last holding something; FolderPlacing, if
        asked for, between them (never inside a push)."""
        if isinstance(message, FolderPlacing):
            if not request.placing or entry.push_open:
                raise WireError(ErrorCode.PROTOCOL_VIOLATION, "a FolderPlacing not asked for")
            return
        if isinstance(message, FolderRoot):
            if entry.push_open:
                raise WireError(ErrorCode.PROTOCOL_VIOLATION, "a FolderRoot inside a push")
            if request.push_budget and (self.version or 0) >= FOLDER_PUSH_VERSION:
                entry.push_open = True
                entry.budget_left = request.push_budget
            return
        if not isinstance(message, FolderNodes) or not entry.push_open:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "reply does not match WatchFolder")
        entry.budget_left -= message.size
        if entry.budget_left < 0:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "pushed folder nodes beyond the budget")
        if message.last:
            entry.push_open = False
        elif message.empty:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "an empty FolderNodes not last")

    def _check_have(self, message: Message, entry: _Outstanding) -> None:
        """HaveReply first (sets the piece count), then HaveUpdates within it; open-ended."""
        if isinstance(message, HaveReply):
            if entry.chunks_left != 1:
                raise WireError(ErrorCode.PROTOCOL_VIOLATION, "a second HaveReply")
            entry.chunks_left = 0
            entry.piece_count = message.piece_count
            return
        if not isinstance(message, HaveUpdate) or entry.chunks_left:
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "reply does not match GetHave")
        if any(piece >= entry.piece_count for piece in message.pieces):
            raise WireError(ErrorCode.PROTOCOL_VIOLATION, "HaveUpdate names a piece out of range")
