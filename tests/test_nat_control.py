"""The control-stream codec (relay and punch messages), sans-I/O, with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.net.control import (
    MAX_CANDIDATES,
    MAX_DATAGRAM,
    MAX_FRAME,
    Accept,
    Candidates,
    Connect,
    ControlError,
    ControlKind,
    ControlMessage,
    Data,
    Decoder,
    Incoming,
    Refuse,
    RefuseCode,
    Register,
    encode,
    encode_datagrams,
)

node_ids = st.binary(min_size=32, max_size=32)
addresses = st.tuples(st.ip_addresses().map(str), st.integers(1, 65535))
messages: st.SearchStrategy[ControlMessage] = st.one_of(
    st.just(Register()),
    st.just(Accept()),
    node_ids.map(Connect),
    node_ids.map(Incoming),
    st.builds(Refuse, st.sampled_from(RefuseCode), st.text(max_size=50)),
    st.lists(addresses, max_size=MAX_CANDIDATES).map(lambda a: Candidates(tuple(a))),
    st.binary(min_size=1, max_size=MAX_DATAGRAM).map(Data),
)


@settings(max_examples=200, deadline=None)
@given(sequence=st.lists(messages, max_size=8), cuts=st.lists(st.integers(0, 5000), max_size=6))
def test_messages_round_trip_however_the_bytes_are_split(
    sequence: list[ControlMessage], cuts: list[int]
) -> None:
    wire = b"".join(encode(m) for m in sequence)
    decoder = Decoder()
    got: list[ControlMessage] = []
    start = 0
    for cut in [*sorted(c for c in cuts if c < len(wire)), len(wire)]:
        decoder.feed(wire[start:cut])
        start = cut
        while (message := decoder.next_untrusted()) is not None:
            got.append(message)
    assert got == sequence
    assert decoder.buffered == 0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000))
def test_arbitrary_bytes_raise_only_control_errors(data: bytes) -> None:
    decoder = Decoder()
    decoder.feed(data)
    try:
        while decoder.next_untrusted() is not None:
            pass
    except ControlError:
        pass
    # Bounded: never more than one frame's worth waits for completion.
    assert decoder.buffered <= len(data)


@settings(max_examples=50, deadline=None)
@given(datagrams=st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=20))
def test_datagram_runs_frame_one_each(datagrams: list[bytes]) -> None:
    decoder = Decoder()
    decoder.feed(encode_datagrams(datagrams))
    got = []
    while (message := decoder.next_untrusted()) is not None:
        assert isinstance(message, Data)
        got.append(message.datagram)
    assert got == datagrams


def test_oversized_and_empty_frames_are_refused_from_the_header() -> None:
    for header in ((MAX_FRAME + 1).to_bytes(2, "big"), b"\x00\x00"):
        decoder = Decoder()
        decoder.feed(header)
        with pytest.raises(ControlError):
            decoder.next_untrusted()


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x02\x01\x00",  # REGISTER with a body
        b"\x00\x05\x02abcd",  # CONNECT with a short NodeId
        b"\x00\x02\x06\x09",  # more candidates than allowed
        b"\x00\x03\x06\x01\x05",  # a candidate of unknown family
        b"\x00\x01\x07",  # an empty datagram
        b"\x00\x01\x7f",  # unknown type
    ],
)
def test_malformed_frames_are_control_errors(frame: bytes) -> None:
    decoder = Decoder()
    decoder.feed(frame)
    with pytest.raises(ControlError):
        decoder.next_untrusted()


def test_a_request_stream_cannot_look_like_a_control_stream() -> None:
    """Request streams start with a u32 frame length <= 16 MiB + 4096: first byte 0 or 1."""
    assert all(kind > 0x01 for kind in ControlKind)
