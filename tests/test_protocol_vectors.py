"""The code against the golden vectors in protocol/vectors (the normative contract)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import blake3
import pytest

from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker, ChunkerParams, chunk_id
from p2pfs.content.folder import DIR_TREE, FILE_TREE, MANIFEST_CONTEXT, Manifest
from p2pfs.content.tree import TreeSchema, build_tree
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import INDEX_TREE, SignedRecord, build_index, index_leaf
from p2pfs.sync.versions import FileVersion
from p2pfs.wire.frames import FrameDecoder
from p2pfs.wire.messages import decode_message_untrusted, encode_message
from p2pfs.wire.session import PROTOCOL_VERSION

VECTORS_FILE = Path(__file__).parent.parent / "protocol" / "vectors" / "content.json"
DOCUMENT = json.loads(VECTORS_FILE.read_text())
VECTORS = {vector["name"]: vector for vector in DOCUMENT["vectors"]}


def encoding_of(vector: dict[str, Any]) -> bytes:
    return bytes.fromhex("".join(hex_part for hex_part, _note in vector["encoding"]))


def test_contexts_are_the_codes() -> None:
    assert DOCUMENT["contexts"] == {
        "file_tree_node": FILE_TREE.context,
        "directory_tree_node": DIR_TREE.context,
        "share_manifest": MANIFEST_CONTEXT,
    }


@pytest.mark.parametrize("name", [n for n in VECTORS if n.startswith("chunk-id-")])
def test_chunk_ids(name: str) -> None:
    vector = VECTORS[name]
    assert chunk_id(bytes.fromhex(vector["input_hex"])).hex() == vector["chunk_id"]


def test_fastcdc_cut_points() -> None:
    vector = VECTORS["fastcdc-cuts"]
    assert ChunkerParams.from_wire_untrusted(vector["chunker"]) == DEFAULT_CHUNKER
    data = blake3.blake3(vector["xof_input"].encode()).digest(length=vector["length"])
    assert Chunker().cut_lengths(data) == vector["cut_lengths"]


@pytest.mark.parametrize(
    ("name", "schema"),
    [
        ("file-leaf-node", FILE_TREE),
        ("file-branch-node", FILE_TREE),
        ("dir-node-bin", DIR_TREE),
        ("dir-node-top", DIR_TREE),
    ],
)
def test_tree_node_encodings_and_hashes(name: str, schema: TreeSchema[Any]) -> None:
    vector = VECTORS[name]
    encoded = encoding_of(vector)
    node = schema.decode_untrusted(encoded)
    assert schema.encode(node) == encoded
    # The hash rule, computed straight from BLAKE3 rather than through the code.
    expected = blake3.blake3(encoded, derive_key_context=vector["context"]).hexdigest()
    assert expected == vector["node_hash"]
    assert schema.node_hash(encoded).hex() == vector["node_hash"]


def test_empty_trees() -> None:
    vector = VECTORS["empty-trees"]
    assert build_tree(FILE_TREE, [])[0].hash.hex() == vector["empty_file_root"]
    assert build_tree(DIR_TREE, [])[0].hash.hex() == vector["empty_dir_root"]
    assert vector["encoding_hex"] == "9201" + "90"


def test_small_folder_and_manifest() -> None:
    chunker = Chunker()
    hello = build_tree(FILE_TREE, chunker.chunk_refs(b"hello\n"))[0]
    top = DIR_TREE.decode_untrusted(encoding_of(VECTORS["dir-node-top"]))
    entries = {entry.name: entry for entry in top.leaves}  # type: ignore[union-attr]
    assert entries["hello.txt"].hash == hello.hash
    bin_hash = VECTORS["dir-node-bin"]["node_hash"]
    assert entries["bin"].hash.hex() == bin_hash
    assert entries["empty"].hash.hex() == VECTORS["empty-trees"]["empty_dir_root"]

    vector = VECTORS["manifest"]
    encoded = encoding_of(vector)
    manifest = Manifest.decode_untrusted(encoded)
    assert manifest.tree.hash.hex() == VECTORS["dir-node-top"]["node_hash"]
    assert manifest.encode() == encoded
    assert manifest.root().hex() == vector["share_root"]
    assert (
        blake3.blake3(encoded, derive_key_context=MANIFEST_CONTEXT).hexdigest()
        == (vector["share_root"])
    )


WIRE = json.loads((VECTORS_FILE.parent / "wire.json").read_text())
WIRE_TYPES = {
    "hello": "Hello",
    "error": "ErrorReply",
    "get-manifest": "GetManifest",
    "manifest-reply": "ManifestReply",
    "get-nodes": "GetNodes",
    "nodes-reply": "NodesReply",
    "get-chunks": "GetChunks",
    "chunk-data": "ChunkData",
    "cancel": "Cancel",
    "get-have": "GetHave",
    "have-reply": "HaveReply",
    "have-reply-complete": "HaveReply",
    "have-update": "HaveUpdate",
    "folder-hello": "FolderHello",
    "folder-challenge": "FolderChallenge",
    "folder-proof": "FolderProof",
    "folder-welcome": "FolderWelcome",
    "watch-folder": "WatchFolder",
    "folder-root": "FolderRoot",
}


def test_wire_vectors_cover_every_message_and_version() -> None:
    assert WIRE["protocol_version"] == PROTOCOL_VERSION
    assert {vector["name"] for vector in WIRE["vectors"]} == set(WIRE_TYPES)


@pytest.mark.parametrize("vector", WIRE["vectors"], ids=lambda v: v["name"])
def test_wire_message_vectors(vector: dict[str, Any]) -> None:
    frame_bytes = encoding_of(vector)
    decoder = FrameDecoder()
    decoder.feed(frame_bytes)
    frame = decoder.next_frame_untrusted()
    assert frame is not None
    message = decode_message_untrusted(frame)
    assert type(message).__name__ == WIRE_TYPES[vector["name"]]
    assert encode_message(message) == frame_bytes


FOLDER = json.loads((VECTORS_FILE.parent / "folder.json").read_text())


def test_folder_keys_derive_as_specified() -> None:
    keys_doc = FOLDER["keys"]
    keys = FolderKeys.from_write_seed(bytes.fromhex(keys_doc["write_seed"]))
    assert keys.read_key.hex() == keys_doc["read_key"]
    assert keys.write_public.hex() == keys_doc["write_public"]
    assert keys.folder_id.hex() == keys_doc["folder_id"]
    assert keys.discovery_key.hex() == keys_doc["discovery_key"]
    read_only = FolderKeys(keys.read_key, keys.write_public)
    proof = FOLDER["membership_proof"]
    client, server = bytes.fromhex(proof["client_node"]), bytes.fromhex(proof["server_node"])
    nonces = bytes.fromhex(proof["client_nonce"]), bytes.fromhex(proof["server_nonce"])
    server_proof = bytes.fromhex(proof["server_proof"])
    client_proof = bytes.fromhex(proof["client_proof"])
    assert read_only.check_proof(server_proof, "server", *nonces, server, client)
    assert read_only.check_proof(client_proof, "client", *nonces, client, server)


def test_signed_records_and_index_tree() -> None:
    keys_doc = FOLDER["keys"]
    keys = FolderKeys(bytes.fromhex(keys_doc["read_key"]), bytes.fromhex(keys_doc["write_public"]))
    by_name = {vector["name"]: vector for vector in FOLDER["vectors"]}
    records = []
    for name in ("live", "tombstone"):
        version = FileVersion.decode_untrusted(encoding_of(by_name[f"file-version-{name}"]))
        vector = by_name[f"signed-record-{name}"]
        record = SignedRecord.decode_untrusted(encoding_of(vector), keys)
        assert record.version == version
        assert record.hash.hex() == vector["record_hash"]
        records.append(record)
    nodes: dict[bytes, bytes] = {}
    root = build_index(
        [index_leaf(record) for record in records],
        lambda node_hash, encoded, _node: nodes.__setitem__(node_hash, encoded),
    )
    assert (root.hash.hex(), root.size) == (
        FOLDER["index_root"]["hash"],
        FOLDER["index_root"]["records"],
    )
    assert FOLDER["index_context"] == INDEX_TREE.context
    node_vector = by_name["index-node"]
    assert nodes[bytes.fromhex(node_vector["hash"])] == encoding_of(node_vector)
