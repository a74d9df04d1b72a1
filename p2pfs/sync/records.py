"""Signed file records and the folder index tree that members compare.

A *signed record* is one :class:`FileVersion` with the folder write key's Ed25519 signature
over it (and over the folder id, so a record cannot be replayed into another folder).
Ed25519 signatures are deterministic, so two read-write members that reach the same record
produce the same bytes, and their trees the same root.

The *index tree* is a content-defined tree (the foundation's :class:`TreeSchema`) whose
leaves are ``[path_key, record_hash]`` sorted by ``path_key`` = BLAKE3(path). Leaves stay
64 bytes whatever the path or vector length, so every node is small; the records themselves
are fetched by hash once the diff has named them. Two members with the same records have
the same root; where roots differ, :func:`p2pfs.content.diff.diff_trees` descends only into
subtrees that differ.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack

from p2pfs.content.diff import LocalNode, RemoteNodes, diff_trees
from p2pfs.content.tree import Child, LeafNode, NodeSink, TreeBuilder, TreeSchema, bound_for
from p2pfs.errors import RemoteProtocolError
from p2pfs.ids import HASH_LEN, ContentHash, content_hash_untrusted
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.versions import MAX_FILE_VERSION_BYTES, FileVersion

SIGNATURE_LEN = 64
RECORD_CONTEXT = "p2pfs 2026-11-22 folder record v1"
PATH_KEY_CONTEXT = "p2pfs 2026-11-22 folder path key v1"
SIGNATURE_DOMAIN = b"p2pfs folder record signature v1\x00"
MAX_SIGNED_RECORD_BYTES = MAX_FILE_VERSION_BYTES + SIGNATURE_LEN + 16
MAX_FOLDER_RECORDS = 1 << 20
"""Records one folder may hold (every member keeps them all in memory, ~0.5 KiB each): a
remote index root claiming more is refused before any node is fetched."""
EMPTY_INDEX = Child(ContentHash(bytes(HASH_LEN)), 0)
"""The root of an index with no records (no node has this hash)."""


def path_key(path: str) -> bytes:
    return blake3.blake3(path.encode("utf-8"), derive_key_context=PATH_KEY_CONTEXT).digest()


def record_hash(encoded: bytes) -> ContentHash:
    return ContentHash(blake3.blake3(encoded, derive_key_context=RECORD_CONTEXT).digest())


@dataclass(frozen=True, slots=True)
class SignedRecord:
    version: FileVersion
    signature: bytes

    @classmethod
    def sign(cls, version: FileVersion, keys: FolderKeys) -> SignedRecord:
        return cls(version, keys.sign(_signed_message(keys.folder_id, version)))

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb([self.version.encode(), self.signature], use_bin_type=True)
        return packed

    @property
    def hash(self) -> ContentHash:
        return record_hash(self.encode())

    @classmethod
    def decode_untrusted(cls, data: bytes, keys: FolderKeys) -> SignedRecord:
        """Parse and check a record from a peer: canonical, well-formed, signed for this folder."""
        if len(data) > MAX_SIGNED_RECORD_BYTES:
            raise RemoteProtocolError(f"signed record of {len(data)} bytes exceeds bound")
        try:
            value = msgpack.unpackb(
                data,
                raw=False,
                max_bin_len=MAX_FILE_VERSION_BYTES,
                max_str_len=0,
                max_array_len=2,
                max_map_len=0,
                max_ext_len=0,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"signed record: malformed msgpack: {exc}") from exc
        if not isinstance(value, list) or len(value) != 2:
            raise RemoteProtocolError("signed record: expected [version, signature]")
        encoded_version, signature = value
        if not isinstance(encoded_version, bytes) or not isinstance(signature, bytes):
            raise RemoteProtocolError("signed record: fields must be bytes")
        if len(signature) != SIGNATURE_LEN:
            raise RemoteProtocolError("signed record: bad signature length")
        version = FileVersion.decode_untrusted(encoded_version)
        record = cls(version, signature)
        if record.encode() != data:
            raise RemoteProtocolError("signed record: encoding is not canonical")
        if not keys.verify(signature, _signed_message(keys.folder_id, version)):
            raise RemoteProtocolError(f"record for {version.path!r}: signature does not verify")
        return record


def _signed_message(folder_id: bytes, version: FileVersion) -> bytes:
    return SIGNATURE_DOMAIN + folder_id + version.encode()


@dataclass(frozen=True, slots=True, order=True)
class IndexLeaf:
    path_key: bytes
    record_hash: ContentHash


class IndexLeafCodec:
    """Leaves of the folder index tree: ``[path_key, record_hash]`` sorted by path key."""

    def leaf_to_wire(self, leaf: IndexLeaf) -> list[Any]:
        return [leaf.path_key, leaf.record_hash]

    def leaf_from_wire_untrusted(self, value: object) -> IndexLeaf:
        if not isinstance(value, list) or len(value) != 2:
            raise RemoteProtocolError("index leaf: expected [path_key, record_hash]")
        key, digest = value
        return IndexLeaf(bytes(content_hash_untrusted(key)), content_hash_untrusted(digest))

    def leaf_key(self, leaf: IndexLeaf) -> bytes:
        return leaf.path_key

    def leaf_size(self, leaf: IndexLeaf) -> int:
        return 1  # a subtree's size is how many records it holds

    strict_order = True

    def leaf_bound(self, size: int) -> int | None:
        return size  # a leaf's size is 1: the size is the record count, exactly

    def check_leaf_order_untrusted(self, previous: IndexLeaf, current: IndexLeaf) -> None:
        if previous.path_key >= current.path_key:
            raise RemoteProtocolError("index leaves out of order or repeated")


INDEX_TREE: TreeSchema[IndexLeaf] = TreeSchema(
    "folder index tree", "p2pfs 2026-11-22 folder index node v1", IndexLeafCodec()
)


def index_leaf(record: SignedRecord) -> IndexLeaf:
    return IndexLeaf(path_key(record.version.path), record.hash)


def build_index(leaves: Iterable[IndexLeaf], sink: NodeSink | None = None) -> Child:
    """The index root over ``leaves`` (any order, one per path); EMPTY_INDEX if none."""
    ordered = sorted(leaves)
    if not ordered:
        return EMPTY_INDEX
    builder = TreeBuilder(INDEX_TREE, sink)
    builder.extend(ordered)
    return builder.finish()


def remote_changes(
    local_root: Child, local_node: LocalNode, remote_root: Child, remote_nodes: RemoteNodes
) -> list[IndexLeaf]:
    """Leaves of the remote index that the local one lacks (only differing subtrees open).

    The remote tree must hold exactly its root's record count (verified node by node), at
    most MAX_FOLDER_RECORDS, with no node twice and leaves strictly increasing: a bomb of a
    few nodes whose children repeat is refused (RemoteProtocolError) after a few nodes.
    """
    if remote_root.size > MAX_FOLDER_RECORDS:
        raise RemoteProtocolError(
            f"folder index of {remote_root.size} records exceeds {MAX_FOLDER_RECORDS}"
        )
    if remote_root in (EMPTY_INDEX, local_root):
        return []
    if remote_root.hash == EMPTY_INDEX.hash:
        raise RemoteProtocolError("folder index: the empty root with a record count")
    if local_root == EMPTY_INDEX:
        return _all_leaves(remote_root, remote_nodes)
    diff = diff_trees(INDEX_TREE, local_root, local_node, remote_root, remote_nodes)
    return [leaf for _offset, leaf in diff.remote_only]


def _all_leaves(root: Child, remote_nodes: RemoteNodes) -> list[IndexLeaf]:
    """Every leaf of a remote tree, one batch of node requests per level."""
    bound = bound_for(INDEX_TREE, root)
    seen: set[ContentHash] = set()
    frontier: list[tuple[Child, int | None]] = [(root, None)]
    leaves: list[IndexLeaf] = []
    while frontier:
        wanted = list(dict.fromkeys(child.hash for child, _root in frontier))
        answers = remote_nodes(wanted)
        if len(answers) != len(wanted):
            raise RemoteProtocolError(f"asked for {len(wanted)} nodes, got {len(answers)}")
        by_hash = dict(zip(wanted, answers, strict=True))
        next_level: list[tuple[Child, int | None]] = []
        for child, height in frontier:
            if child.hash in seen:
                raise RemoteProtocolError("folder index tree: a node occurs twice")
            seen.add(child.hash)
            node = INDEX_TREE.verify_node_untrusted(child, by_hash[child.hash], height)
            bound.open(INDEX_TREE.name, node, is_root=height is None)
            if isinstance(node, LeafNode):
                leaves.extend(node.leaves)
            else:
                next_level.extend((grandchild, node.height - 1) for grandchild in node.children)
        frontier = next_level
    for previous, current in itertools.pairwise(leaves):
        INDEX_TREE.codec.check_leaf_order_untrusted(previous, current)
    return leaves
