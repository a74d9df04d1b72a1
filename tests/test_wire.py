from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import ChunkRef
from p2pfs.errors import LocalProtocolError, RemoteProtocolError
from p2pfs.ids import ContentHash
from p2pfs.wire.codes import ErrorCode, WireError
from p2pfs.wire.frames import MAX_FRAME_BYTES, FrameDecoder, encode_frame
from p2pfs.wire.messages import (
    MAX_PLACING_HELD,
    MAX_PLACING_IDS,
    Cancel,
    ChunkData,
    ErrorReply,
    FolderMember,
    FolderNeed,
    FolderNodes,
    FolderPlacing,
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
    _chunk_data_fast_untrusted,
    _chunk_data_untrusted,
    bitfield_of,
    decode_message_untrusted,
    encode_chunk_data_header,
    encode_message,
)
from p2pfs.wire.session import (
    FRAME_DEADLINE,
    FRAME_MIN_RATE,
    PROTOCOL_VERSION,
    Role,
    StreamSession,
)

hashes = st.binary(min_size=32, max_size=32).map(ContentHash)
request_ids = st.integers(1, 2**64 - 1)
chunk_refs = st.builds(ChunkRef, hashes, st.integers(1, 1 << 20))
messages = st.one_of(
    st.builds(Hello, st.integers(0, 100), st.integers(0, 100), st.text(max_size=64)),
    st.builds(
        ErrorReply, st.integers(0, 2**64 - 1), st.sampled_from(ErrorCode), st.text(max_size=200)
    ),
    st.builds(GetManifest, request_ids, hashes),
    st.builds(ManifestReply, request_ids, st.binary(max_size=4096)),
    st.builds(GetNodes, request_ids, hashes, st.lists(hashes, max_size=20).map(tuple)),
    st.builds(NodesReply, request_ids, st.lists(st.binary(max_size=300), max_size=20).map(tuple)),
    st.builds(GetChunks, request_ids, hashes, st.lists(chunk_refs, max_size=20).map(tuple)),
    st.builds(ChunkData, request_ids, st.integers(0, 255), st.binary(max_size=3000)),
    st.builds(Cancel, request_ids),
    st.builds(GetHave, request_ids, hashes),
    st.lists(st.booleans(), max_size=100).flatmap(
        lambda bits: st.builds(
            HaveReply,
            request_ids,
            st.just(len(bits)),
            st.just(False),
            st.just(bitfield_of([i for i, bit in enumerate(bits) if bit], len(bits))),
        )
    ),
    st.builds(HaveReply, request_ids, st.integers(0, 1 << 24), st.just(True), st.just(b"")),
    st.builds(HaveUpdate, request_ids, st.lists(st.integers(0, 1000), max_size=50).map(tuple)),
    st.builds(GetTree, request_ids, hashes, st.integers(0, 1 << 30), st.booleans()),
    st.builds(
        TreeNodes,
        request_ids,
        st.lists(st.binary(max_size=300), max_size=10).map(tuple),
        st.lists(st.binary(max_size=300), max_size=10).map(tuple),
        st.booleans(),
    ),
    st.builds(WatchFolder, request_ids, hashes, st.integers(0, 1 << 30)),
    st.builds(WatchFolder, request_ids, hashes, st.integers(0, 1 << 30), st.just(True)),
    st.builds(
        FolderPlacing,
        request_ids,
        hashes,
        st.integers(0, MAX_PLACING_HELD),
        st.lists(st.binary(min_size=32, max_size=32), max_size=20).map(tuple),
    ),
    st.builds(
        FolderNodes,
        request_ids,
        st.lists(st.binary(max_size=300), max_size=6).map(tuple),
        st.lists(st.binary(max_size=300), max_size=6).map(tuple),
        st.lists(st.binary(max_size=300), max_size=6).map(tuple),
        st.booleans(),
    ),
)


def decode_one(data: bytes) -> Message:
    decoder = FrameDecoder()
    decoder.feed(data)
    frame = decoder.next_frame_untrusted()
    assert frame is not None
    assert decoder.next_frame_untrusted() is None
    return decode_message_untrusted(frame)


def normalised(message: Message) -> Message:
    if isinstance(message, ChunkData):
        return ChunkData(message.request_id, message.index, bytes(message.payload))
    return message


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    assert normalised(decode_one(encode_message(message))) == normalised(message)


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, min_size=1, max_size=8), st.integers(1, 50))
def test_frames_reassemble_from_any_split(batch: list[Message], step: int) -> None:
    stream = b"".join(encode_message(m) for m in batch)
    decoder = FrameDecoder()
    decoded = []
    for start in range(0, len(stream), step):
        decoder.feed(stream[start : start + step])
        while (frame := decoder.next_frame_untrusted()) is not None:
            decoded.append(normalised(decode_message_untrusted(frame)))
    assert decoded == [normalised(m) for m in batch]


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, min_size=1, max_size=8), st.data())
def test_frames_reassemble_from_pieces_of_any_kind(
    batch: list[Message], data: st.DataObject
) -> None:
    """Pieces fed as bytes (kept uncopied, frames handed out as views into them), bytearray
    or memoryview (copied), in any mix and at any cut: the same frames come out."""
    stream = b"".join(encode_message(m) for m in batch)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=12)))
    decoder = FrameDecoder()
    decoded = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        piece = stream[start:end]
        kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]))
        decoder.feed(kind(piece))
        while (frame := decoder.next_frame_untrusted()) is not None:
            decoded.append(normalised(decode_message_untrusted(frame)))
    assert decoded == [normalised(m) for m in batch]
    assert decoder.buffered == 0


def test_chunk_data_header_matches_whole_encoding() -> None:
    payload = b"x" * 1000
    whole = encode_message(ChunkData(7, 3, payload))
    assert encode_chunk_data_header(7, 3, len(payload)) + payload == whole


def _one_int(value: int) -> st.SearchStrategy[bytes]:
    """``value`` in each msgpack integer encoding that can hold it (signed ones too: a
    peer may use them, and the general path reads them as the same int)."""
    encodings = []
    if 0 <= value < 0x80:
        encodings.append(bytes([value]))
    for tag, width, signed in (
        (0xCC, 1, False), (0xCD, 2, False), (0xCE, 4, False), (0xCF, 8, False),
        (0xD0, 1, True), (0xD1, 2, True), (0xD2, 4, True), (0xD3, 8, True),
    ):  # fmt: skip
        try:
            encodings.append(bytes([tag]) + value.to_bytes(width, "big", signed=signed))
        except OverflowError:
            continue
    if -32 <= value < 0:
        encodings.append(value.to_bytes(1, "big", signed=True))
    return st.sampled_from(encodings)


chunk_headers = st.tuples(
    st.sampled_from([0x92, 0x93, 0x91, 0xDC]),
    st.integers(-40, 2**64 - 1).flatmap(_one_int),
    st.integers(-3, 300).flatmap(_one_int),
    st.binary(max_size=40),
    st.booleans(),
)


@settings(max_examples=600)
@given(chunk_headers, st.binary(max_size=64))
def test_chunk_data_fast_path_returns_only_what_the_general_path_returns(
    header: tuple[int, bytes, bytes, bytes, bool], tail: bytes
) -> None:
    """The fast decoder of ChunkData (``[request id, index]`` as unsigned ints) is a
    shortcut, never a second parser: where it answers, the general path gives the same
    message; it declines everything else, and the whole decoder answers or refuses as the
    general path alone does. Inputs: array headers of 2 (and wrong counts), each int in
    every encoding msgpack allows, bytes cut anywhere, junk after."""
    array, request_id, index, extra, cut = header
    body = bytes([array]) + request_id + index + (extra if array != 0x92 else b"") + tail
    if cut and len(body) > 1:
        body = body[: len(body) // 2]
    view = memoryview(body)
    fast = _chunk_data_fast_untrusted(view)
    try:
        general: ChunkData | WireError = _chunk_data_untrusted(view)
    except WireError as exc:
        general = exc
    if fast is not None:
        assert isinstance(general, ChunkData)
        assert (fast.request_id, fast.index, bytes(fast.payload)) == (
            general.request_id,
            general.index,
            bytes(general.payload),
        )
    whole = encode_frame(ChunkData.TAG, body)
    if isinstance(general, WireError):
        with pytest.raises(WireError) as raised:
            decode_one(whole)
        assert raised.value.code == general.code
    else:
        decoded = decode_one(whole)
        assert isinstance(decoded, ChunkData)
        assert (decoded.request_id, decoded.index, bytes(decoded.payload)) == (
            general.request_id,
            general.index,
            bytes(general.payload),
        )


def test_the_usual_chunk_data_takes_the_fast_path() -> None:
    """What our own server sends is what the shortcut reads (else it would buy nothing)."""
    for request_id, index in ((1, 0), (127, 127), (128, 255), (2**40, 3), (2**64 - 1, 200)):
        body = encode_chunk_data_header(request_id, index, 5)[5:] + b"hello"
        fast = _chunk_data_fast_untrusted(memoryview(body))
        assert fast is not None
        assert (fast.request_id, fast.index, bytes(fast.payload)) == (request_id, index, b"hello")


def test_newer_peers_extra_fields_are_ignored() -> None:
    body = msgpack.packb([5, bytes(32), "a field from the future"], use_bin_type=True)
    assert decode_one(encode_frame(GetManifest.TAG, body)) == GetManifest(5, ContentHash(bytes(32)))


def test_folder_need_and_device_are_appended_fields_both_ways() -> None:
    """A peer from before the need/device fields sends three or two fields: it decodes
    with none; ours decodes with them; and an old decoder (which reads only the fields it
    knows) gets from our message exactly what it got before."""
    root = ContentHash(bytes([3]) * 32)
    old = msgpack.packb([7, root, 12], use_bin_type=True)
    assert decode_one(encode_frame(FolderRoot.TAG, old)) == FolderRoot(7, root, 12, None)
    ours = FolderRoot(7, root, 12, FolderNeed(2, 300, 9, 1000))
    decoded = decode_one(encode_message(ours))
    assert decoded == ours
    fields = msgpack.unpackb(encode_message(ours)[5:], raw=False)
    assert fields[:3] == [7, bytes(root), 12]
    member = FolderMember(bytes([9]) * 32, "10.0.0.2", 7337)
    old_welcome = msgpack.packb([6, [[member.node_id, "10.0.0.2", 7337]]], use_bin_type=True)
    assert decode_one(encode_frame(FolderWelcome.TAG, old_welcome)) == FolderWelcome(
        6, (member,), None
    )
    welcome = FolderWelcome(6, (member,), bytes([0x42]) * 32)
    assert decode_one(encode_message(welcome)) == welcome


def test_folder_root_signature_is_appended_after_the_need() -> None:
    """A read-write member appends its root signature after the need; a decoder from before
    it reads the need as ever; one of 63 or 65 bytes is a violation."""
    root = ContentHash(bytes([3]) * 32)
    signed = FolderRoot(7, root, 12, FolderNeed(2, 300, 9, 1000), bytes([5]) * 64)
    assert decode_one(encode_message(signed)) == signed
    fields = msgpack.unpackb(encode_message(signed)[5:], raw=False)
    assert fields[:7] == [7, bytes(root), 12, 2, 300, 9, 1000] and fields[7] == bytes([5]) * 64
    for length in (63, 65):
        body = msgpack.packb([*fields[:7], bytes(length)], use_bin_type=True)
        with pytest.raises(WireError) as info:
            decode_one(encode_frame(FolderRoot.TAG, body))
        assert info.value.code is ErrorCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize(
    "fields",
    [
        [7, bytes(32), 12, 1],  # a need cut short
        [7, bytes(32), 12, 1, 2, 3, -4],
        [7, bytes(32), 12, 1, 2, 3, 1 << 49],
        [7, bytes(32), 12, 1, "2", 3, 4],
    ],
)
def test_malformed_folder_need_is_a_violation(fields: list[object]) -> None:
    with pytest.raises(WireError) as info:
        decode_one(encode_frame(FolderRoot.TAG, msgpack.packb(fields, use_bin_type=True)))
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize(
    ("need", "percent"),
    [
        (FolderNeed(0, 0, 10, 1000), 100.0),
        (FolderNeed(0, 0, 0, 0), 100.0),
        (FolderNeed(5, 450, 10, 1000), 55.0),
        (FolderNeed(1, 1, 10, 1 << 30), 99.9),  # a byte missing is not 100%
        (FolderNeed(2, 0, 4, 0), 50.0),  # empty files only: by count
        (FolderNeed(3, 5000, 10, 1000), 0.0),  # a peer's inconsistent figures stay in range
        (FolderNeed(1, 0, 0, 0), 0.0),
    ],
)
def test_folder_need_percent(need: FolderNeed, percent: float) -> None:
    assert need.percent == percent
    assert need.as_dict()["percent"] == percent


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (encode_frame(0x7E, msgpack.packb([1])), ErrorCode.UNKNOWN_MESSAGE),
        (encode_frame(0x00, b""), ErrorCode.UNKNOWN_MESSAGE),
        (encode_frame(GetManifest.TAG, msgpack.packb([1])), ErrorCode.PROTOCOL_VIOLATION),
        (encode_frame(GetManifest.TAG, msgpack.packb([1, b"short"])), ErrorCode.PROTOCOL_VIOLATION),
        (encode_frame(GetManifest.TAG, msgpack.packb({"a": 1})), ErrorCode.PROTOCOL_VIOLATION),
        (
            encode_frame(GetManifest.TAG, msgpack.packb([1, bytes(32)]) + b"x"),
            ErrorCode.PROTOCOL_VIOLATION,
        ),
        (
            encode_frame(GetChunks.TAG, msgpack.packb([1, bytes(32), [[0, bytes(32)]]])),
            ErrorCode.PROTOCOL_VIOLATION,
        ),
        (
            encode_frame(GetNodes.TAG, msgpack.packb([1, bytes(32), [bytes(32)] * 257])),
            ErrorCode.PROTOCOL_VIOLATION,
        ),
        (encode_frame(Hello.TAG, msgpack.packb(["http", 1, 1, "x"])), ErrorCode.VERSION_UNKNOWN),
        (encode_frame(ChunkData.TAG, b"\x92"), ErrorCode.PROTOCOL_VIOLATION),
    ],
)
def test_malformed_messages_raise_wire_errors_with_codes(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(WireError) as info:
        decode_one(data)
    assert info.value.code is code


def test_oversized_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder()
    decoder.feed((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(WireError) as info:
        decoder.next_frame_untrusted()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered == 4  # nothing allocated for the promised body


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_junk_raises_only_remote_protocol_errors(junk: bytes) -> None:
    session = StreamSession(Role.SERVER)
    session.receive_data(junk)
    try:
        while session.next_message() is not None:
            pass
    except RemoteProtocolError:
        pass


def pair() -> tuple[StreamSession, StreamSession]:
    client, server = StreamSession(Role.CLIENT), StreamSession(Role.SERVER)
    server.receive_data(client.hello())
    client.receive_data(server.hello())
    assert isinstance(server.next_message(), Hello)
    assert isinstance(client.next_message(), Hello)
    return client, server


def test_pipelined_requests_and_in_order_replies() -> None:
    client, server = pair()
    root = ContentHash(bytes(32))
    refs = (ChunkRef(ContentHash(b"a" * 32), 3), ChunkRef(ContentHash(b"b" * 32), 2))
    server.receive_data(client.send(GetChunks(1, root, refs)) + client.send(GetManifest(2, root)))
    assert server.next_message() == GetChunks(1, root, refs)
    assert server.next_message() == GetManifest(2, root)
    client.receive_data(
        server.send(ChunkData(1, 0, b"abc"))
        + server.send(ChunkData(1, 1, b"de"))
        + server.send(ErrorReply(2, ErrorCode.NOT_FOUND, "no such share"))
    )
    assert bytes(client.next_message().payload) == b"abc"  # type: ignore[union-attr]
    assert bytes(client.next_message().payload) == b"de"  # type: ignore[union-attr]
    assert client.next_message() == ErrorReply(2, ErrorCode.NOT_FOUND, "no such share")
    assert client.outstanding_count == 0


@pytest.mark.parametrize(
    "reply",
    [
        ChunkData(9, 0, b"abc"),  # nobody asked for request 9
        ChunkData(1, 1, b"de"),  # out of order
        ChunkData(1, 0, b"abcd"),  # wrong length
        NodesReply(1, ()),  # wrong type
    ],
)
def test_unsolicited_or_mismatched_replies_are_violations(reply: Message) -> None:
    client, server = pair()
    refs = (ChunkRef(ContentHash(b"a" * 32), 3), ChunkRef(ContentHash(b"b" * 32), 2))
    server.receive_data(client.send(GetChunks(1, ContentHash(bytes(32)), refs)))
    client.receive_data(encode_message(reply))
    with pytest.raises(WireError) as info:
        client.next_message()
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION


def test_stream_must_start_with_hello_and_only_once() -> None:
    server = StreamSession(Role.SERVER)
    server.receive_data(encode_message(GetManifest(1, ContentHash(bytes(32)))))
    with pytest.raises(WireError):
        server.next_message()
    client, server = pair()
    server.receive_data(client.hello())
    with pytest.raises(WireError):
        server.next_message()


def test_server_refuses_decreasing_request_ids_and_client_messages_from_server() -> None:
    client, server = pair()
    root = ContentHash(bytes(32))
    server.receive_data(encode_message(GetManifest(5, root)) + encode_message(GetManifest(5, root)))
    server.next_message()
    with pytest.raises(WireError):
        server.next_message()
    client.receive_data(encode_message(GetManifest(1, root)))
    with pytest.raises(WireError):
        client.next_message()
    with pytest.raises(LocalProtocolError):
        server.send(GetManifest(1, root))


def test_versions_too_old_and_unknown_are_distinct() -> None:
    session = StreamSession(Role.SERVER)
    session.receive_data(encode_message(Hello(0, 0, "ancient")))
    with pytest.raises(WireError) as info:
        session.next_message()
    assert info.value.code is ErrorCode.VERSION_TOO_OLD
    session = StreamSession(Role.SERVER)
    session.receive_data(encode_message(Hello(PROTOCOL_VERSION + 5, PROTOCOL_VERSION + 1, "f")))
    with pytest.raises(WireError) as info:
        session.next_message()
    assert info.value.code is ErrorCode.VERSION_UNKNOWN
    session = StreamSession(Role.SERVER)
    session.receive_data(encode_message(Hello(PROTOCOL_VERSION + 5, 1, "newer, compatible")))
    assert isinstance(session.next_message(), Hello)
    assert session.version == PROTOCOL_VERSION


def test_have_subscription_flow_and_rules() -> None:
    client, server = pair()
    root = ContentHash(bytes(32))
    server.receive_data(client.send(GetHave(1, root)))
    assert server.next_message() == GetHave(1, root)
    with pytest.raises(LocalProtocolError):  # nothing may follow a GetHave on its stream
        client.send(GetManifest(2, root))
    reply = HaveReply(1, 10, False, bitfield_of([0, 3, 9], 10))
    client.receive_data(server.send(reply) + server.send(HaveUpdate(1, (4, 5))))
    received = client.next_message()
    assert received == reply and received.pieces() == [0, 3, 9]  # type: ignore[union-attr]
    assert client.next_message() == HaveUpdate(1, (4, 5))
    client.receive_data(encode_message(HaveUpdate(1, (10,))))  # out of range
    with pytest.raises(WireError):
        client.next_message()


def test_have_update_before_reply_and_requests_after_get_have_are_violations() -> None:
    client, server = pair()
    root = ContentHash(bytes(32))
    server.receive_data(client.send(GetHave(1, root)) + encode_message(GetManifest(2, root)))
    server.next_message()
    with pytest.raises(WireError):
        server.next_message()
    client.receive_data(encode_message(HaveUpdate(1, (0,))))
    with pytest.raises(WireError):
        client.next_message()


def test_tree_push_spans_frames_within_its_budget() -> None:
    client, server = pair()
    root = ContentHash(bytes(32))
    server.receive_data(
        client.send(GetTree(1, root, 100, True)) + client.send(GetManifest(2, root))
    )
    assert server.next_message() == GetTree(1, root, 100, True)
    assert server.next_message() == GetManifest(2, root)
    client.receive_data(
        server.send(TreeNodes(1, (b"d" * 40,), (b"f" * 20,), False))
        + server.send(TreeNodes(1, (), (b"f" * 40,), True))  # exactly the budget
        + server.send(ManifestReply(2, b"m"))
    )
    assert client.next_message() == TreeNodes(1, (b"d" * 40,), (b"f" * 20,), False)
    assert client.next_message() == TreeNodes(1, (), (b"f" * 40,), True)
    assert client.next_message() == ManifestReply(2, b"m")
    assert client.outstanding_count == 0


@pytest.mark.parametrize(
    "frames",
    [
        [TreeNodes(1, (b"d" * 60,), (b"f" * 41,), True)],  # one byte over the budget
        [TreeNodes(1, (b"d" * 90,), (), False), TreeNodes(1, (), (b"f" * 11,), True)],
        [TreeNodes(1, (), (), True), TreeNodes(1, (), (), True)],  # after the last one
        [TreeNodes(1, (), (), False)],  # empty and not the last: frames without end
        [NodesReply(1, ())],  # not what answers a GetTree
    ],
)
def test_tree_push_beyond_its_budget_or_end_is_a_violation(frames: list[Message]) -> None:
    client, server = pair()
    server.receive_data(client.send(GetTree(1, ContentHash(bytes(32)), 100, True)))
    client.receive_data(b"".join(encode_message(frame) for frame in frames))
    with pytest.raises(WireError) as info:
        for _frame in frames:
            client.next_message()
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION


def watching(
    version: int = PROTOCOL_VERSION, budget: int = 100, *, placing: bool = False
) -> StreamSession:
    """A client session whose WatchFolder (push budget ``budget``, asking for placements
    if ``placing``) reached a server speaking ``version``."""
    client, server = StreamSession(Role.CLIENT), StreamSession(Role.SERVER, version=version)
    watch = WatchFolder(1, ContentHash(bytes(32)), budget, placing)
    server.receive_data(client.hello() + client.send(watch))
    client.receive_data(server.hello())
    assert isinstance(server.next_message(), Hello)
    assert isinstance(client.next_message(), Hello)
    return client


def root_message(records: int = 1) -> FolderRoot:
    return FolderRoot(1, ContentHash(bytes([records]) * 32), records)


def test_a_folder_push_follows_each_root_within_its_budget() -> None:
    client = watching()
    frames: list[Message] = [
        root_message(1),
        FolderNodes(1, (b"i" * 30,), (b"r" * 30,), (), False),
        FolderNodes(1, (), (), (b"f" * 40,), True),  # exactly the budget
        root_message(2),
        FolderNodes(1, (), (), (), True),  # an empty push: only its last frame
        root_message(3),
    ]
    client.receive_data(b"".join(map(encode_message, frames)))
    for frame in frames:
        assert client.next_message() == frame
        still_open = isinstance(frame, FolderRoot) or not getattr(frame, "last", True)
        assert client.push_open == still_open
    assert client.outstanding_count == 1  # the watch stays open


@pytest.mark.parametrize(
    "frames",
    [
        [root_message(), FolderNodes(1, (b"i" * 60,), (b"r" * 41,), (), True)],  # over by one
        [root_message(), FolderNodes(1, (), (), (), False)],  # empty and not the last
        [root_message(), root_message(2)],  # a root inside a push
        [FolderNodes(1, (), (), (), True)],  # a push before any root
        [root_message(), FolderNodes(1, (), (), (), True), FolderNodes(1, (), (), (), True)],
        [root_message(), NodesReply(1, ())],  # not what follows a root
    ],
)
def test_a_folder_push_out_of_its_rules_is_a_violation(frames: list[Message]) -> None:
    client = watching()
    client.receive_data(b"".join(encode_message(frame) for frame in frames))
    with pytest.raises(WireError) as info:
        for _frame in frames:
            client.next_message()
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION


def placing_message(start: int = 0, ids: int = 1) -> FolderPlacing:
    return FolderPlacing(1, ContentHash(bytes([7]) * 32), start, (bytes([9]) * 32,) * ids)


def test_placements_come_between_roots_when_asked_for() -> None:
    client = watching(placing=True)
    frames: list[Message] = [
        placing_message(),
        root_message(1),
        FolderNodes(1, (), (), (), True),
        placing_message(1),
        placing_message(2),
        root_message(2),
    ]
    client.receive_data(b"".join(map(encode_message, frames)))
    for frame in frames:
        assert client.next_message() == frame
    assert client.outstanding_count == 1


@pytest.mark.parametrize(
    ("placing", "frames"),
    [
        (False, [placing_message()]),  # not asked for
        (False, [root_message(), FolderNodes(1, (), (), (), True), placing_message()]),
        (True, [root_message(), placing_message()]),  # inside a push
    ],
)
def test_a_placement_not_asked_for_or_inside_a_push_is_a_violation(
    placing: bool, frames: list[Message]
) -> None:
    client = watching(placing=placing)
    client.receive_data(b"".join(encode_message(frame) for frame in frames))
    with pytest.raises(WireError) as info:
        for _frame in frames:
            client.next_message()
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION


def test_a_placement_with_a_malformed_chunk_id_is_a_violation() -> None:
    fields = [1, bytes(32), 0, [bytes(31)]]
    with pytest.raises(WireError) as info:
        decode_one(encode_frame(FolderPlacing.TAG, msgpack.packb(fields)))
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    too_many = [1, bytes(32), 0, [bytes(32)] * (MAX_PLACING_IDS + 1)]
    with pytest.raises(WireError):
        decode_one(encode_frame(FolderPlacing.TAG, msgpack.packb(too_many)))


def test_an_older_server_reads_a_watch_asking_for_placements_as_one_asking_a_push() -> None:
    """Its decoder took three fields and ignored the rest: the fourth is only appended."""
    root = ContentHash(bytes(32))
    fields = msgpack.unpackb(encode_message(WatchFolder(1, root, 100, True))[5:])
    assert fields[:3] == [1, bytes(root), 100] and fields[3] is True


@pytest.mark.parametrize(("version", "budget"), [(1, 100), (PROTOCOL_VERSION, 0)])
def test_no_push_is_due_from_an_older_server_or_without_a_budget(version: int, budget: int) -> None:
    client = watching(version, budget)
    client.receive_data(encode_message(root_message(1)) + encode_message(root_message(2)))
    assert client.next_message() == root_message(1)
    assert not client.push_open
    assert client.next_message() == root_message(2)  # the next root, no push between
    client.receive_data(encode_message(FolderNodes(1, (), (), (), True)))
    with pytest.raises(WireError):
        client.next_message()


def test_a_watch_without_a_budget_encodes_as_before() -> None:
    """Older servers read two fields; a client asking no push sends just those."""
    root = ContentHash(bytes(32))
    assert encode_message(WatchFolder(1, root)) == encode_message(WatchFolder(1, root, 0))
    assert decode_one(encode_message(WatchFolder(1, root))) == WatchFolder(1, root, 0)


def test_folder_nodes_hold_at_most_a_reply_of_items_between_their_lists() -> None:
    fields = [1, [b"n"] * 100, [b"n"] * 100, [b"n"] * 57, False]
    with pytest.raises(WireError):
        decode_one(encode_frame(FolderNodes.TAG, msgpack.packb(fields)))
    fields[3] = [b"n"] * 56
    decoded = decode_one(encode_frame(FolderNodes.TAG, msgpack.packb(fields)))
    assert isinstance(decoded, FolderNodes) and len(decoded.file_nodes) == 56


def test_tree_nodes_hold_at_most_a_reply_of_nodes_between_both_lists() -> None:
    fields = [1, [b"n"] * 200, [b"n"] * 57, False]
    with pytest.raises(WireError):
        decode_one(encode_frame(TreeNodes.TAG, msgpack.packb(fields)))
    fields[2] = [b"n"] * 56
    assert len(decode_one(encode_frame(TreeNodes.TAG, msgpack.packb(fields))).file_nodes) == 56  # type: ignore[union-attr]


def test_frames_inside_one_fed_object_are_views_and_spanning_ones_are_joined_once() -> None:
    """After a frame that spanned two feeds, the frames wholly inside the second feed are
    still views into it (the decoder kept its own buffer before, and copied them)."""
    frames = [encode_frame(0x20, bytes([n]) * 1000) for n in range(4)]
    stream = b"".join(frames)
    first, second = stream[:1500], stream[1500:]  # the second frame spans both
    decoder = FrameDecoder()
    decoder.feed(first)
    decoder.feed(second)
    bodies = []
    while (frame := decoder.next_frame_untrusted()) is not None:
        bodies.append(frame.body)
    assert [bytes(b) for b in bodies] == [bytes([n]) * 1000 for n in range(4)]
    assert bodies[0].obj is first
    assert bodies[1].obj is not first and bodies[1].obj is not second
    assert bodies[2].obj is second and bodies[3].obj is second
    assert decoder.buffered == 0 and decoder.unfinished_since is None


@given(st.integers(min_value=1, max_value=40), st.floats(min_value=0.5, max_value=9.5))
def test_a_frame_still_arriving_is_not_overdue_and_one_that_stops_is(
    pieces: int, gap: float
) -> None:
    """A server's frame is overdue once its bytes stop coming for FRAME_DEADLINE, whatever
    it took so far; one still arriving, however slowly, only past its size at FRAME_MIN_RATE
    (64 KiB/s until session 39: frames sharing a slow path were reset while arriving)."""
    client = StreamSession(Role.CLIENT)
    client.receive_data(StreamSession(Role.SERVER).hello(), 0.0)
    assert client.next_message() is not None
    payload = bytes(64 * 1024)
    frame = encode_message(ChunkData(1, 0, payload))
    bound = FRAME_DEADLINE + len(frame) / FRAME_MIN_RATE  # its size at the floor rate
    assert bound > 60  # a 64 KiB reply may take a minute (it was 11 s)
    step = len(frame) // (pieces + 1)
    now = 0.0
    for index in range(pieces):
        client.receive_data(frame[index * step : (index + 1) * step], now)
        deadline = client.frame_deadline()
        assert deadline is not None
        assert abs(deadline - min(now + FRAME_DEADLINE, bound)) < 0.01  # bound: header aside
        if now + gap <= 60:
            assert now + gap < deadline  # its next bytes come in time
        now += gap
