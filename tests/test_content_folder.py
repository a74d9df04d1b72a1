from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker
from p2pfs.content.folder import (
    DIR_TREE,
    FILE_TREE,
    DirEntry,
    EntryKind,
    Manifest,
    sorted_entries,
)
from p2pfs.content.tree import MAX_NODE_BYTES, Child, build_tree
from p2pfs.errors import InvalidNameError, RemoteProtocolError
from p2pfs.ids import ContentHash
from tests.helpers_content import build_folder, random_bytes

H = ContentHash(bytes(range(32)))


def sample_tree() -> dict[str, object]:
    return {
        "README": b"hello\n",
        "empty": b"",
        "bin": {"run.sh": (b"#!/bin/sh\necho hi\n", True)},
        "docs": {"r\u00e9sum\u00e9.txt": random_bytes(1, 300_000), "nested": {}},
    }


def test_identical_folders_built_in_different_orders_share_a_root() -> None:
    chunker = Chunker()
    forward = build_folder(sample_tree(), {}, chunker)
    reordered = dict(reversed(list(sample_tree().items())))
    assert build_folder(reordered, {}, chunker) == forward


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.__setitem__("README", b"hello!\n"),
        lambda t: t["bin"].__setitem__("run.sh", b"#!/bin/sh\necho hi\n"),  # exec bit
        lambda t: t.__setitem__("README2", t.pop("README")),  # rename
        lambda t: t["docs"]["nested"].__setitem__("x", b""),
        lambda t: t["docs"].pop("nested"),  # an empty directory counts
    ],
)
def test_any_content_change_changes_the_root(change) -> None:  # type: ignore[no-untyped-def]
    chunker = Chunker()
    before = build_folder(sample_tree(), {}, chunker)
    tree = sample_tree()
    change(tree)
    assert build_folder(tree, {}, chunker) != before


def test_sorted_entries_refuses_duplicates() -> None:
    entry = DirEntry("a", EntryKind.FILE, 0, 0, H)
    with pytest.raises(InvalidNameError):
        sorted_entries([entry, entry])


def test_sorting_is_by_utf8_bytes() -> None:
    names = ["\u00e9", "z", "Z", "a", "\U0001f600"]
    ordered = [e.name for e in sorted_entries(DirEntry(n, EntryKind.FILE, 0, 0, H) for n in names)]
    assert ordered == ["Z", "a", "z", "\u00e9", "\U0001f600"]


def test_manifest_round_trip_and_root() -> None:
    manifest = Manifest("photos", DEFAULT_CHUNKER, Child(H, 123), 4, 2, False)
    encoded = manifest.encode()
    assert Manifest.decode_untrusted(encoded) == manifest
    assert manifest.root() != H


@pytest.mark.parametrize(
    "value",
    [
        [2, "x"],  # unknown version
        ["1"],
        [1, "..", DEFAULT_CHUNKER.to_wire(), bytes(32), 0, 0, 0, False],
        [1, "x", DEFAULT_CHUNKER.to_wire(), bytes(31), 0, 0, 0, False],
        [1, "x", DEFAULT_CHUNKER.to_wire(), bytes(32), -1, 0, 0, False],
        [1, "x", DEFAULT_CHUNKER.to_wire(), bytes(32), 0, 0, 0, 1],
        {"a": 1},
    ],
)
def test_manifest_rejects_malformed_values(value: object) -> None:
    with pytest.raises(RemoteProtocolError):
        Manifest.decode_untrusted(msgpack.packb(value, use_bin_type=True))


def test_non_canonical_encodings_are_rejected() -> None:
    root, nodes = build_tree(DIR_TREE, [DirEntry("a", EntryKind.FILE, 0, 5, H)])
    canonical = nodes[root.hash]
    # The same value with the height as a 64-bit integer instead of a fixint.
    padded = b"\x92\xcf" + (1).to_bytes(8, "big") + canonical[2:]
    assert msgpack.unpackb(padded) == msgpack.unpackb(canonical)
    with pytest.raises(RemoteProtocolError):
        DIR_TREE.decode_untrusted(padded)


@pytest.mark.parametrize(
    "entry",
    [
        ["a/b", 0, 0, 1, bytes(32)],
        ["..", 0, 0, 1, bytes(32)],
        ["a", 2, 0, 1, bytes(32)],
        ["a", 0, 2, 1, bytes(32)],
        ["a", 1, 1, 1, bytes(32)],
        ["a", 0, 0, -5, bytes(32)],
        ["a\u0301", 0, 0, 1, bytes(32)],
        ["a", 0, 0, 1, "x" * 32],
    ],
)
def test_directory_entries_are_validated(entry: list[object]) -> None:
    with pytest.raises(RemoteProtocolError):
        DIR_TREE.decode_untrusted(msgpack.packb([1, [entry]], use_bin_type=True))


def test_unsorted_or_repeated_entries_are_rejected() -> None:
    a = ["a", 0, 0, 1, bytes(32)]
    b = ["b", 0, 0, 1, bytes(32)]
    for entries in ([b, a], [a, a]):
        with pytest.raises(RemoteProtocolError):
            DIR_TREE.decode_untrusted(msgpack.packb([1, entries], use_bin_type=True))


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(RemoteProtocolError):
        FILE_TREE.decode_untrusted(b"\x92\x01" + b"\x00" * MAX_NODE_BYTES)
    # A header promising a 4 GiB array must not allocate it.
    with pytest.raises(RemoteProtocolError):
        FILE_TREE.decode_untrusted(b"\x92\x01\xdd\xff\xff\xff\xff")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_raise_only_remote_protocol_errors(data: bytes) -> None:
    for decode in (
        FILE_TREE.decode_untrusted,
        DIR_TREE.decode_untrusted,
        Manifest.decode_untrusted,
    ):
        with contextlib.suppress(RemoteProtocolError):
            decode(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(msgpack_values)
def test_structured_junk_raises_only_remote_protocol_errors(value: object) -> None:
    encoded = msgpack.packb(value, use_bin_type=True)
    for decode in (
        FILE_TREE.decode_untrusted,
        DIR_TREE.decode_untrusted,
        Manifest.decode_untrusted,
    ):
        with contextlib.suppress(RemoteProtocolError):
            decode(encoded)
