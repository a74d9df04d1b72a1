"""Regenerate the golden vectors in protocol/vectors/ from the code.

Run only when a format changes on purpose (and bump the version that changed): the vectors
are the contract, and tests/test_protocol_vectors.py holds the code to them.

    .venv/bin/python protocol/tools/make_vectors.py content > protocol/vectors/content.json
    .venv/bin/python protocol/tools/make_vectors.py wire > protocol/vectors/wire.json
    .venv/bin/python protocol/tools/make_vectors.py folder > protocol/vectors/folder.json
    .venv/bin/python protocol/tools/make_vectors.py ticket > protocol/vectors/ticket.json
    .venv/bin/python protocol/tools/make_vectors.py transport > protocol/vectors/transport.json
    .venv/bin/python protocol/tools/make_vectors.py discovery > protocol/vectors/discovery.json

Every input is fixed (keys from fixed seeds, fixed nonces and ids), so a run reproduces the
files byte for byte; `git diff protocol/vectors` after a run shows what a change did.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import msgpack
from net_vectors import discovery_vectors, ticket_vectors, transport_vectors
from vectorlib import annotate, encoding_vector, pseudo_random

from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker, ChunkRef, chunk_id
from p2pfs.content.folder import (
    DIR_TREE,
    FILE_TREE,
    FLAG_EXECUTABLE,
    DirEntry,
    EntryKind,
    Manifest,
)
from p2pfs.content.tree import BranchNode, Child, LeafNode, build_tree
from p2pfs.ids import ContentHash
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import (
    INDEX_TREE,
    SignedRecord,
    build_index,
    index_leaf,
    root_statement,
    sign_root,
)
from p2pfs.sync.versions import FileVersion, VersionVector
from p2pfs.wire.codes import ErrorCode
from p2pfs.wire.messages import (
    Cancel,
    ChunkData,
    ErrorReply,
    FolderChallenge,
    FolderHello,
    FolderMember,
    FolderNeed,
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
    bitfield_of,
    encode_message,
)
from p2pfs.wire.session import PROTOCOL_VERSION


def content_vectors() -> dict[str, Any]:
    vectors: list[dict[str, Any]] = []

    for label, data in (("empty", b""), ("p2pfs", b"p2pfs"), ("1KiB-zeros", bytes(1024))):
        vectors.append(
            {
                "name": f"chunk-id-{label}",
                "description": "chunk id = BLAKE3-256 (plain mode) of the chunk bytes",
                "input_hex": data.hex(),
                "chunk_id": chunk_id(data).hex(),
            }
        )

    buffer_label = "p2pfs chunking vector"
    cuts = Chunker().cut_lengths(pseudo_random(buffer_label, 2 << 20))
    vectors.append(
        {
            "name": "fastcdc-cuts",
            "description": (
                "chunk lengths of the first 2 MiB of BLAKE3 XOF output of the ASCII input, "
                "with the default chunker params"
            ),
            "xof_input": buffer_label,
            "length": 2 << 20,
            "chunker": DEFAULT_CHUNKER.to_wire(),
            "cut_lengths": cuts,
        }
    )

    chunks = [ChunkRef(chunk_id(b"alpha"), 5), ChunkRef(chunk_id(b"beta!!"), 6)]
    leaf = LeafNode(tuple(chunks))
    leaf_encoded = FILE_TREE.encode(leaf)
    vector = encoding_vector(
        "file-leaf-node",
        "file tree node at height 1 listing chunks 'alpha' and 'beta!!' as [length, id]",
        [1, [[c.length, c.id] for c in chunks]],
        leaf_encoded,
    )
    vector["context"] = FILE_TREE.context
    vector["node_hash"] = FILE_TREE.node_hash(leaf_encoded).hex()
    vectors.append(vector)

    children = (
        Child(FILE_TREE.node_hash(leaf_encoded), 11),
        Child(ContentHash(bytes(range(32))), 70000),
    )
    branch_encoded = FILE_TREE.encode(BranchNode(2, children))
    vector = encoding_vector(
        "file-branch-node",
        "file tree node at height 2: children as [hash, size]",
        [2, [[c.hash, c.size] for c in children]],
        branch_encoded,
    )
    vector["context"] = FILE_TREE.context
    vector["node_hash"] = FILE_TREE.node_hash(branch_encoded).hex()
    vectors.append(vector)

    # A small folder: hello.txt, bin/run (executable), empty/ (an empty directory).
    hello_root, _ = build_tree(FILE_TREE, Chunker().chunk_refs(b"hello\n"))
    script = b"#!/bin/sh\necho hi\n"
    run_root, _ = build_tree(FILE_TREE, Chunker().chunk_refs(script))
    empty_dir, _ = build_tree(DIR_TREE, [])
    bin_entries = [DirEntry("run", EntryKind.FILE, FLAG_EXECUTABLE, len(script), run_root.hash)]
    bin_root, bin_nodes = build_tree(DIR_TREE, bin_entries)
    top_entries = [
        DirEntry("bin", EntryKind.DIRECTORY, 0, bin_root.size, bin_root.hash),
        DirEntry("empty", EntryKind.DIRECTORY, 0, 0, empty_dir.hash),
        DirEntry("hello.txt", EntryKind.FILE, 0, 6, hello_root.hash),
    ]
    top_root, top_nodes = build_tree(DIR_TREE, top_entries)
    for name, root, nodes, entries in (
        ("dir-node-bin", bin_root, bin_nodes, bin_entries),
        ("dir-node-top", top_root, top_nodes, top_entries),
    ):
        vector = encoding_vector(
            name,
            "directory tree node at height 1: entries [name, kind, flags, size, root]",
            [1, [DIR_TREE.codec.leaf_to_wire(e) for e in entries]],
            nodes[root.hash],
        )
        vector["context"] = DIR_TREE.context
        vector["node_hash"] = root.hash.hex()
        vectors.append(vector)
    vectors.append(
        {
            "name": "empty-trees",
            "description": "an empty file and an empty directory are each one empty node",
            "empty_file_root": build_tree(FILE_TREE, [])[0].hash.hex(),
            "empty_dir_root": empty_dir.hash.hex(),
            "encoding_hex": msgpack.packb([1, []]).hex(),
        }
    )

    manifest = Manifest("demo", DEFAULT_CHUNKER, top_root, 2, 2, False)
    manifest_encoded = manifest.encode()
    vector = encoding_vector(
        "manifest",
        "share manifest v1 of the small folder above; its keyed hash is the share root",
        [
            1,
            "demo",
            DEFAULT_CHUNKER.to_wire(),
            top_root.hash,
            top_root.size,
            2,
            2,
            False,
        ],
        manifest_encoded,
    )
    vector["share_root"] = manifest.root().hex()
    vectors.append(vector)

    return {
        "contexts": {
            "file_tree_node": FILE_TREE.context,
            "directory_tree_node": DIR_TREE.context,
            "share_manifest": "p2pfs 2026-11-22 share manifest v1",
        },
        "vectors": vectors,
    }


def wire_vectors() -> dict[str, Any]:
    root = ContentHash(bytes.fromhex("11" * 32))
    chunk = ChunkRef(chunk_id(b"alpha"), 5)
    examples: list[tuple[str, Message]] = [
        ("hello", Hello(1, 1, "p2pfs/0.1")),
        ("error", ErrorReply(3, ErrorCode.NOT_FOUND, "no such share")),
        ("get-manifest", GetManifest(1, root)),
        ("manifest-reply", ManifestReply(1, b"\x98\x01")),
        ("get-nodes", GetNodes(2, root, (ContentHash(bytes(32)),))),
        ("nodes-reply", NodesReply(2, (b"\x92\x01\x90",))),
        ("get-chunks", GetChunks(3, root, (chunk,))),
        ("chunk-data", ChunkData(3, 0, b"alpha")),
        ("cancel", Cancel(3)),
        ("get-have", GetHave(4, root)),
        ("have-reply", HaveReply(4, 10, False, bitfield_of([0, 3, 9], 10))),
        ("have-reply-complete", HaveReply(4, 3315, True, b"")),
        ("have-update", HaveUpdate(4, (4, 5))),
        ("get-tree", GetTree(8, root, 4 << 20, True)),
        ("tree-nodes", TreeNodes(8, (b"\x92\x01\x90",), (b"\x92\x01\x90",), False)),
        ("tree-nodes-last", TreeNodes(8, (), (), True)),
        ("folder-hello", FolderHello(5, root, bytes(range(32)))),
        ("folder-challenge", FolderChallenge(5, bytes(range(32, 64)), bytes(32))),
        ("folder-proof", FolderProof(6, root, bytes([7]) * 32)),
        ("folder-welcome", FolderWelcome(6, (FolderMember(bytes([9]) * 32, "10.0.0.2", 7337),))),
        (
            "folder-welcome-device",
            FolderWelcome(
                6, (FolderMember(bytes([9]) * 32, "10.0.0.2", 7337),), bytes([0x42]) * 32
            ),
        ),
        ("watch-folder", WatchFolder(7, root)),
        ("watch-folder-push", WatchFolder(7, root, 256 << 10)),
        ("watch-folder-placing", WatchFolder(7, root, 256 << 10, placing=True)),
        ("folder-root", FolderRoot(7, ContentHash(bytes([0x22]) * 32), 12)),
        (
            "folder-root-need",
            FolderRoot(7, ContentHash(bytes([0x22]) * 32), 12, FolderNeed(3, 1 << 20, 10, 5 << 20)),
        ),
        (
            "folder-root-signed",
            FolderRoot(
                7,
                ContentHash(bytes([0x22]) * 32),
                12,
                FolderNeed(3, 1 << 20, 10, 5 << 20),
                bytes([0x5A]) * 64,
            ),
        ),
        (
            "folder-nodes",
            FolderNodes(7, (b"\x92\x01\x90",), (b"\x92\xc4\x01\x00\xc4\x00",), (), False),
        ),
        ("folder-nodes-last", FolderNodes(7, (), (), (), True)),
        (
            "folder-placing",
            FolderPlacing(
                7, ContentHash(bytes([0x33]) * 32), 2, (bytes([0x44]) * 32, bytes([0x55]) * 32)
            ),
        ),
        ("folder-placing-nothing", FolderPlacing(7, ContentHash(bytes(32)), 0, ())),
    ]
    vectors = []
    for name, message in examples:
        frame = encode_message(message)
        header = msgpack.packb(message.fields(), use_bin_type=True)
        payload = bytes(message.payload) if isinstance(message, ChunkData) else b""
        pieces = [
            [frame[:4].hex(), f"frame length {len(frame) - 4} (u32 big-endian: tag + body)"],
            [frame[4:5].hex(), f"tag 0x{message.TAG:02x} = {type(message).__name__}"],
            *annotate(msgpack.unpackb(header, raw=False), "fields"),
        ]
        if payload:
            pieces.append([payload.hex(), f"raw chunk payload, {len(payload)} bytes"])
        assert "".join(hex_part for hex_part, _ in pieces) == frame.hex(), name
        vectors.append({"name": name, "encoding": pieces})
    return {"protocol_version": PROTOCOL_VERSION, "vectors": vectors}


def folder_vectors() -> dict[str, Any]:
    seed = pseudo_random("folder write seed", 32)
    keys = FolderKeys.from_write_seed(seed)
    device = pseudo_random("device", 32)
    client, server = pseudo_random("client node", 32), pseudo_random("server node", 32)
    client_nonce, server_nonce = pseudo_random("client nonce", 32), pseudo_random("nonce", 32)
    live = FileVersion(
        "docs/a.txt",
        VersionVector.of({device: 3}),
        False,
        ContentHash(pseudo_random("file root", 32)),
        1234,
        True,
        1_700_000_000_123_456_789,
        device,
    )
    dead = FileVersion.tombstone("old.txt", VersionVector.of({device: 2}), 1_700_000_000, device)
    records = [SignedRecord.sign(version, keys) for version in (live, dead)]
    nodes: dict[ContentHash, bytes] = {}
    root = build_index(
        [index_leaf(record) for record in records],
        lambda node_hash, encoded, _node: nodes.__setitem__(node_hash, encoded),
    )
    vectors = [
        encoding_vector(
            f"file-version-{name}",
            "a FileVersion: [path, [[device, counter]...], deleted, root|nil, size, "
            "executable, mtime_ns, modified_by]",
            version.to_wire(),
            version.encode(),
        )
        for name, version in (("live", live), ("tombstone", dead))
    ]
    for name, record in zip(("live", "tombstone"), records, strict=True):
        vector = encoding_vector(
            f"signed-record-{name}",
            "[FileVersion encoding, Ed25519 signature over 'p2pfs folder record signature v1' "
            "NUL || folder_id || FileVersion encoding]",
            [record.version.encode(), record.signature],
            record.encode(),
        )
        vector["record_hash"] = record.hash.hex()
        vectors.append(vector)
    for node_hash, encoded in nodes.items():
        vector = encoding_vector(
            "index-node", "a folder index tree node", msgpack.unpackb(encoded), encoded
        )
        vector["hash"] = node_hash.hex()
        vectors.append(vector)
    return {
        "keys": {
            "write_seed": seed.hex(),
            "read_key": keys.read_key.hex(),
            "write_public": keys.write_public.hex(),
            "folder_id": keys.folder_id.hex(),
            "discovery_key": keys.discovery_key.hex(),
        },
        "membership_proof": {
            "client_node": client.hex(),
            "server_node": server.hex(),
            "client_nonce": client_nonce.hex(),
            "server_nonce": server_nonce.hex(),
            "server_proof": keys.membership_proof(
                "server", client_nonce, server_nonce, server, client
            ).hex(),
            "client_proof": keys.membership_proof(
                "client", client_nonce, server_nonce, client, server
            ).hex(),
        },
        "index_root": {
            "hash": root.hash.hex(),
            "records": root.size,
            "statement": root_statement(keys.folder_id, root).hex(),
            "signature": sign_root(keys, root).hex(),
        },
        "index_context": INDEX_TREE.context,
        "vectors": vectors,
    }


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "content"
    makers: dict[str, Callable[[], dict[str, Any]]] = {
        "content": content_vectors,
        "wire": wire_vectors,
        "folder": folder_vectors,
        "ticket": ticket_vectors,
        "transport": transport_vectors,
        "discovery": discovery_vectors,
    }
    document = makers[which]()
    json.dump(document, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
