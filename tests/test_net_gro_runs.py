"""Which GRO runs go to one connection whole (net/endpoint.py ``one_connection_run``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.net.endpoint import CID_LENGTH, QUIC_FIXED_BIT, one_connection_run


def reference(data: bytes, segment: int) -> bytes | None:
    """The per-datagram loop it replaced: every datagram's first byte a short header's, and
    the same connection id after it."""
    if not data or data[0] & 0xC0 != QUIC_FIXED_BIT:
        return None
    dcid = data[1 : 1 + CID_LENGTH]
    if len(dcid) < CID_LENGTH:
        return None
    for start in range(segment, len(data), segment):
        if data[start] & 0xC0 != QUIC_FIXED_BIT or not data.startswith(dcid, start + 1):
            return None
    return dcid


CID = bytes(range(1, CID_LENGTH + 1))


@st.composite
def runs(draw: st.DrawFn) -> tuple[bytes, int]:
    """Runs that mostly qualify, with a datagram now and then spoiled in one place."""
    segment = draw(st.integers(1, 40))
    count = draw(st.integers(1, 12))
    last = draw(st.integers(1, segment))
    datagrams = []
    for number in range(count):
        size = segment if number < count - 1 else last
        body = bytearray(bytes([QUIC_FIXED_BIT | 0x01]) + CID + bytes(max(0, size)))[:size]
        if draw(st.integers(0, 5)) == 0 and body:
            at = draw(st.integers(0, len(body) - 1))
            body[at] = draw(st.integers(0, 255))
        datagrams.append(bytes(body))
    return b"".join(datagrams), segment


@settings(max_examples=1000, deadline=None)
@given(runs())
def test_the_strided_check_agrees_with_the_loop(run: tuple[bytes, int]) -> None:
    data, segment = run
    assert one_connection_run(data, segment) == reference(data, segment)


@given(st.binary(max_size=200), st.integers(1, 64))
def test_any_bytes_agree_with_the_loop(data: bytes, segment: int) -> None:
    assert one_connection_run(data, segment) == reference(data, segment)


def test_a_bulk_run_qualifies_and_a_foreign_datagram_spoils_it() -> None:
    datagram = bytes([QUIC_FIXED_BIT]) + CID + bytes(1341)
    assert one_connection_run(datagram * 40, 1350) == CID
    relay = bytes([0x03]) + bytes(1349)
    assert one_connection_run(datagram * 20 + relay + datagram * 19, 1350) is None
