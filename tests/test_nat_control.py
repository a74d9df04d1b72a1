"""The control-stream codec (relay and punch messages), sans-I/O, with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.net.control import (
    CIRCUIT_LEN,
    MAX_CANDIDATES,
    MAX_FRAME,
    MAX_REASON,
    RELAY_DATAGRAM,
    Accept,
    Candidates,
    Connect,
    ControlError,
    ControlKind,
    ControlMessage,
    Decoder,
    Incoming,
    Refuse,
    RefuseCode,
    Register,
    encode,
    parse_relay_datagram_untrusted,
    relay_datagram,
)

node_ids = st.binary(min_size=32, max_size=32)
circuits = st.binary(min_size=CIRCUIT_LEN, max_size=CIRCUIT_LEN)
addresses = st.tuples(st.ip_addresses().map(str), st.integers(1, 65535))
messages: st.SearchStrategy[ControlMessage] = st.one_of(
    st.just(Register()),
    st.just(Accept()),
    circuits.map(Accept),
    node_ids.map(Connect),
    st.builds(Incoming, node_ids, circuits),
    st.builds(Refuse, st.sampled_from(RefuseCode), st.text(max_size=50)),
    st.lists(addresses, max_size=MAX_CANDIDATES).map(lambda a: Candidates(tuple(a))),
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


@settings(max_examples=100, deadline=None)
@given(circuit=circuits, datagram=st.binary(min_size=1, max_size=1500))
def test_relay_datagrams_round_trip_and_are_neither_quic_nor_dht(
    circuit: bytes, datagram: bytes
) -> None:
    wire = relay_datagram(circuit, datagram)
    assert parse_relay_datagram_untrusted(wire) == (circuit, datagram)
    assert wire[0] == RELAY_DATAGRAM and not wire[0] & 0x40 and wire[0] not in (0, 1)


@pytest.mark.parametrize("data", [b"", b"\x03", b"\x03" + bytes(CIRCUIT_LEN), b"\x43" + bytes(20)])
def test_what_is_no_relay_datagram_is_refused(data: bytes) -> None:
    with pytest.raises(ControlError):
        parse_relay_datagram_untrusted(data)


def test_the_longest_frame_fits_the_limit() -> None:
    longest = encode(Refuse(RefuseCode.BUSY, "x" * (MAX_REASON + 50)))
    assert len(longest) == 2 + MAX_FRAME
    eight_v6 = Candidates(tuple((f"2001:db8::{i}", 65535) for i in range(MAX_CANDIDATES)))
    assert len(encode(eight_v6)) <= 2 + MAX_FRAME


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
        b"\x00\x01\x07",  # DATA: reserved, never sent
        b"\x00\x05\x04abcd",  # ACCEPT with a short circuit id
        b"\x00\x21\x03" + bytes(32),  # INCOMING without a circuit id
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
