from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.errors import LocalProtocolError, RemoteProtocolError
from p2pfs.ids import ContentHash
from p2pfs.sync.versions import (
    MAX_DEVICES,
    FileVersion,
    Ordering,
    VersionVector,
    short_device,
)

DEVICES = [bytes([i]) * 32 for i in range(1, 6)]
A, B = DEVICES[0], DEVICES[1]
ROOT = ContentHash(bytes(range(32)))

devices = st.sampled_from(DEVICES)
vectors = st.dictionaries(devices, st.integers(0, 5), max_size=5).map(VersionVector.of)
big_vectors = st.dictionaries(
    st.binary(min_size=32, max_size=32), st.integers(1, 1 << 62), max_size=8
).map(VersionVector.of)


def le(a: VersionVector, b: VersionVector) -> bool:
    return a.compare(b) in (Ordering.BEFORE, Ordering.EQUAL)


@given(vectors, vectors)
def test_merge_is_commutative(a: VersionVector, b: VersionVector) -> None:
    assert a.merge(b) == b.merge(a)


@given(vectors, vectors, vectors)
def test_merge_is_associative(a: VersionVector, b: VersionVector, c: VersionVector) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@given(vectors)
def test_merge_is_idempotent(a: VersionVector) -> None:
    assert a.merge(a) == a


@given(vectors, vectors)
def test_merge_is_the_least_upper_bound(a: VersionVector, b: VersionVector) -> None:
    merged = a.merge(b)
    assert le(a, merged)
    assert le(b, merged)
    # Least: merge(a, b) equals b exactly when a <= b.
    assert (merged == b) == le(a, b)


@given(vectors, devices)
def test_bump_makes_after(a: VersionVector, device: bytes) -> None:
    bumped = a.bump(device)
    assert bumped.compare(a) is Ordering.AFTER
    assert a.compare(bumped) is Ordering.BEFORE
    assert bumped.counter(device) == a.counter(device) + 1


@given(vectors, vectors)
def test_compare_is_antisymmetric(a: VersionVector, b: VersionVector) -> None:
    mirror = {
        Ordering.EQUAL: Ordering.EQUAL,
        Ordering.BEFORE: Ordering.AFTER,
        Ordering.AFTER: Ordering.BEFORE,
        Ordering.CONCURRENT: Ordering.CONCURRENT,
    }
    assert b.compare(a) is mirror[a.compare(b)]
    assert (a.compare(b) is Ordering.EQUAL) == (a == b)


@given(vectors, devices, devices)
def test_independent_bumps_are_concurrent(a: VersionVector, x: bytes, y: bytes) -> None:
    expected = Ordering.EQUAL if x == y else Ordering.CONCURRENT
    assert a.bump(x).compare(a.bump(y)) is expected


def test_mapping_view_and_normal_form() -> None:
    vector = VersionVector.of({B: 2, A: 1, DEVICES[2]: 0})
    assert list(vector) == [A, B]
    assert dict(vector) == {A: 1, B: 2}
    assert vector.counter(DEVICES[2]) == 0
    with pytest.raises(KeyError):
        vector[DEVICES[2]]
    assert hash(vector) == hash(VersionVector.of({A: 1, B: 2}))
    with pytest.raises(LocalProtocolError):
        VersionVector(((B, 1), (A, 1)))
    with pytest.raises(LocalProtocolError):
        VersionVector.empty().bump(b"short")


@given(big_vectors)
def test_vector_round_trip(a: VersionVector) -> None:
    assert VersionVector.decode_untrusted(a.encode()) == a


file_versions = st.builds(
    lambda path, vector, device, live, root, size, exe, mtime: FileVersion(
        path,
        vector.bump(device),
        not live,
        ContentHash(root) if live else None,
        size if live else 0,
        exe and live,
        mtime,
        device,
    ),
    st.sampled_from(["a", "dir/b.txt", "r\u00e9sum\u00e9/\u00e9.md", ".hidden"]),
    big_vectors,
    st.binary(min_size=32, max_size=32),
    st.booleans(),
    st.binary(min_size=32, max_size=32),
    st.integers(0, (1 << 63) - 1),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 63) - 1),
)


@given(file_versions)
def test_file_version_round_trip(version: FileVersion) -> None:
    assert FileVersion.decode_untrusted(version.encode()) == version


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_junk_bytes_raise_only_remote_protocol_error(data: bytes) -> None:
    for decode in (VersionVector.decode_untrusted, FileVersion.decode_untrusted):
        with contextlib.suppress(RemoteProtocolError):
            decode(data)


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 64), (1 << 64) - 1)
    | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=9),
    max_leaves=30,
)


@settings(max_examples=300)
@given(wire_values)
def test_wrong_shapes_raise_only_remote_protocol_error(value: object) -> None:
    for parse in (VersionVector.from_wire_untrusted, FileVersion.from_wire_untrusted):
        with contextlib.suppress(RemoteProtocolError):
            parse(value)


@given(file_versions, st.integers(0, 7), wire_values)
def test_mutated_fields_raise_only_remote_protocol_error(
    version: FileVersion, index: int, junk: object
) -> None:
    wire = version.to_wire()
    wire[index] = junk
    with contextlib.suppress(RemoteProtocolError):
        FileVersion.from_wire_untrusted(wire)


def good_wire() -> list[object]:
    return FileVersion("d/f", VersionVector.empty().bump(A), False, ROOT, 5, True, 7, A).to_wire()


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, "../etc/passwd"),
        (0, "/abs"),
        (0, "a\x00b"),
        (0, "a//b"),
        (0, "e\u0301"),  # not NFC
        (1, [[B, 1], [A, 1]]),  # out of order
        (1, [[A, 1], [A, 2]]),  # repeated
        (1, [[A, 0]]),  # zero counters are never on the wire
        (1, [[B, 1]]),  # modified_by missing from its vector
        (2, True),  # tombstone with a root
        (3, None),  # live file without a root
        (4, -1),
        (7, b"short"),
    ],
)
def test_specific_bad_fields_are_rejected(index: int, value: object) -> None:
    wire = good_wire()
    wire[index] = value
    with pytest.raises(RemoteProtocolError):
        FileVersion.from_wire_untrusted(wire)


def test_non_canonical_encodings_are_rejected() -> None:
    version = FileVersion("f", VersionVector.empty().bump(A), False, ROOT, 5, False, 7, A)
    data = version.encode()
    wide = b"\xcf" + (5).to_bytes(8, "big")  # 5 as uint64: same value, another encoding
    wire = version.to_wire()
    packed = msgpack.packb(wire[:4], use_bin_type=True)
    rest = b"".join(msgpack.packb(v, use_bin_type=True) for v in wire[5:])
    forged = b"\x98" + packed[1:] + wide + rest
    assert msgpack.unpackb(forged) == msgpack.unpackb(data)
    with pytest.raises(RemoteProtocolError):
        FileVersion.decode_untrusted(forged)
    with pytest.raises(RemoteProtocolError):
        FileVersion.decode_untrusted(data + b"\x00")


def test_vector_bounds() -> None:
    many = [[i.to_bytes(32, "big"), 1] for i in range(MAX_DEVICES + 1)]
    with pytest.raises(RemoteProtocolError):
        VersionVector.from_wire_untrusted(many)
    with pytest.raises(RemoteProtocolError):
        VersionVector.decode_untrusted(msgpack.packb(many, use_bin_type=True))


def test_short_device_matches_node_id_text() -> None:
    assert short_device(bytes(32)) == "aaaaaaa"
    assert len(short_device(bytes(range(32)))) == 7
