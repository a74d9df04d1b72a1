"""The code against the golden vectors in protocol/vectors (the normative contract)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import blake3
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pfs.address import PeerAddress
from p2pfs.content.chunking import DEFAULT_CHUNKER, Chunker, ChunkerParams, chunk_id
from p2pfs.content.folder import DIR_TREE, FILE_TREE, MANIFEST_CONTEXT, Manifest
from p2pfs.content.tree import TreeSchema, build_tree
from p2pfs.discovery.beacon import Beacon, MessageType, parse_beacon_untrusted
from p2pfs.discovery.dht import messages as dht
from p2pfs.discovery.keys import (
    MAINLINE_KEY_CONTEXT,
    RELAY_FOR_KEY_CONTEXT,
    RELAYS_KEY_CONTEXT,
    SHARE_KEY_CONTEXT,
    mainline_info_hash,
    relay_for_discovery_key,
    relays_discovery_key,
    share_discovery_key,
)
from p2pfs.errors import RemoteProtocolError
from p2pfs.identity import Identity
from p2pfs.ids import ContentHash, NodeId, node_id_untrusted
from p2pfs.net import auth, control
from p2pfs.sync.keys import FolderKeys
from p2pfs.sync.records import (
    INDEX_TREE,
    SignedRecord,
    build_index,
    index_leaf,
    root_signature_valid,
    root_statement,
)
from p2pfs.sync.versions import FileVersion
from p2pfs.wire import messages
from p2pfs.wire.frames import FrameDecoder
from p2pfs.wire.messages import decode_message_untrusted, encode_message
from p2pfs.wire.session import PROTOCOL_VERSION
from p2pfs.wire.ticket import TICKET_VERSION, RelayHint, Ticket, TicketKind, parse_ticket_untrusted

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
    "get-tree": "GetTree",
    "tree-nodes": "TreeNodes",
    "tree-nodes-last": "TreeNodes",
    "folder-hello": "FolderHello",
    "folder-challenge": "FolderChallenge",
    "folder-proof": "FolderProof",
    "folder-welcome": "FolderWelcome",
    "folder-welcome-device": "FolderWelcome",
    "watch-folder": "WatchFolder",
    "watch-folder-push": "WatchFolder",
    "watch-folder-placing": "WatchFolder",
    "folder-root": "FolderRoot",
    "folder-root-need": "FolderRoot",
    "folder-root-signed": "FolderRoot",
    "folder-nodes": "FolderNodes",
    "folder-nodes-last": "FolderNodes",
    "folder-placing": "FolderPlacing",
    "folder-placing-nothing": "FolderPlacing",
}


def test_wire_vectors_cover_every_message_and_version() -> None:
    assert WIRE["protocol_version"] == PROTOCOL_VERSION
    assert {vector["name"] for vector in WIRE["vectors"]} == set(WIRE_TYPES)
    # Every message this version knows has a vector (a new message needs one).
    known = {
        name
        for name, value in vars(messages).items()
        if isinstance(value, type) and getattr(value, "TAG", None) in messages.BOUNDS
    }
    assert set(WIRE_TYPES.values()) == known


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
    statement = bytes.fromhex(FOLDER["index_root"]["statement"])
    assert statement == root_statement(keys.folder_id, root)
    assert root_signature_valid(keys, root, bytes.fromhex(FOLDER["index_root"]["signature"]))
    node_vector = by_name["index-node"]
    assert nodes[bytes.fromhex(node_vector["hash"])] == encoding_of(node_vector)


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((VECTORS_FILE.parent / name).read_text())
    return document


def from_json(value: Any) -> Any:
    """The typed JSON of vectors/*.json back to msgpack values: {"bin": hex} is bytes and
    {"map": [[key, value]...]} a map, in order."""
    if isinstance(value, list):
        return [from_json(item) for item in value]
    if isinstance(value, dict) and set(value) == {"bin"}:
        return bytes.fromhex(value["bin"])
    if isinstance(value, dict) and set(value) == {"map"}:
        return {from_json(k): from_json(v) for k, v in value["map"]}
    return value


def hex_or_none(text: str | None) -> bytes | None:
    return None if text is None else bytes.fromhex(text)


# --- tickets (vectors/ticket.json, WIRE.md "Tickets") ---------------------------------------

TICKETS = load("ticket.json")


def ticket_of(doc: dict[str, Any]) -> Ticket:
    return Ticket(
        TicketKind(doc["kind"]),
        ContentHash(bytes.fromhex(doc["root"])),
        None if doc["node_id"] is None else NodeId(bytes.fromhex(doc["node_id"])),
        tuple(PeerAddress(host, port) for host, port in doc["addresses"]),
        hex_or_none(doc["write_public"]),
        tuple(
            RelayHint(NodeId(bytes.fromhex(node)), PeerAddress(host, port))
            for node, host, port in doc["relays"]
        ),
    )


def documented_ticket_fields(doc: dict[str, Any]) -> list[Any]:
    """The payload array exactly as WIRE.md describes it, from the vector's plain fields."""
    fields: list[Any] = [
        doc["kind"],
        bytes.fromhex(doc["root"]),
        hex_or_none(doc["node_id"]),
        doc["addresses"],
    ]
    if doc["kind"] == TicketKind.FOLDER_RO or doc["relays"]:
        fields.append(hex_or_none(doc["write_public"]))
    if doc["relays"]:
        fields.append([[bytes.fromhex(n), host, port] for n, host, port in doc["relays"]])
    return fields


def test_ticket_vectors_cover_every_kind_with_and_without_hints() -> None:
    assert TICKETS["format_version"] == TICKET_VERSION
    docs = [vector["ticket"] for vector in TICKETS["vectors"]]
    assert {doc["kind"] for doc in docs} == {int(kind) for kind in TicketKind}
    for kind in TicketKind:
        of_kind = [doc for doc in docs if doc["kind"] == kind]
        assert any(doc["addresses"] for doc in of_kind), kind
        assert any(doc["relays"] for doc in of_kind), kind
    assert any(doc["node_id"] is None for doc in docs)
    assert any(doc["node_id"] and not doc["addresses"] for doc in docs)


@pytest.mark.parametrize("vector", TICKETS["vectors"], ids=lambda v: v["name"])
def test_ticket_vectors(vector: dict[str, Any]) -> None:
    payload = encoding_of(vector)
    checksum = bytes.fromhex(vector["checksum"])
    # The layout, computed here from the documented rules rather than by the codec.
    assert msgpack.unpackb(payload, raw=False) == documented_ticket_fields(vector["ticket"])
    assert blake3.blake3(payload).digest()[:4] == checksum
    body = base64.b32encode(payload + checksum).decode("ascii").rstrip("=").lower()
    assert vector["text"] == "p2pfs1" + body
    # Both directions through the code.
    ticket = ticket_of(vector["ticket"])
    assert ticket.encode() == vector["text"]
    assert parse_ticket_untrusted(vector["text"]) == ticket


# --- NodeIds, authentication, control frames (vectors/transport.json, WIRE.md) --------------

TRANSPORT = load("transport.json")
TRANSPORT_VECTORS = {vector["name"]: vector for vector in TRANSPORT["vectors"]}


def identity_of(role: str) -> Identity:
    seed = bytes.fromhex(TRANSPORT["identities"][role]["ed25519_seed"])
    return Identity.from_private_key(Ed25519PrivateKey.from_private_bytes(seed))


@pytest.mark.parametrize("role", sorted(TRANSPORT["identities"]))
def test_identities_from_fixed_seeds(role: str) -> None:
    doc = TRANSPORT["identities"][role]
    identity = identity_of(role)
    public_key = bytes.fromhex(doc["public_key"])
    assert identity.public_key == public_key
    assert blake3.blake3(public_key).hexdigest() == doc["node_id"]
    assert identity.node_id.raw.hex() == doc["node_id"]
    assert str(identity.node_id) == doc["node_id_text"]
    assert node_id_untrusted(doc["node_id_text"]) == identity.node_id


@pytest.mark.parametrize("vector", TRANSPORT["node_id_texts"], ids=lambda v: v["name"])
def test_node_id_text(vector: dict[str, str]) -> None:
    raw = bytes.fromhex(vector["node_id"])
    assert base64.b32encode(raw).decode("ascii").rstrip("=").lower() == vector["text"]
    assert str(NodeId(raw)) == vector["text"]
    assert node_id_untrusted(vector["text"]) == NodeId(raw)


@pytest.mark.parametrize("vector", TRANSPORT["rejected_node_id_texts"], ids=lambda v: v["why"])
def test_node_id_text_rejected(vector: dict[str, str]) -> None:
    with pytest.raises(RemoteProtocolError):
        node_id_untrusted(vector["text"])


def test_client_authentication_proof() -> None:
    client, server = identity_of("client"), identity_of("server")
    nonce = bytes.fromhex(TRANSPORT_VECTORS["auth-nonce"]["nonce"])
    transcript = encoding_of(TRANSPORT_VECTORS["auth-transcript"])
    assert transcript == (
        b"p2pfs/1 client authentication\x00" + nonce + client.node_id.raw + server.node_id.raw
    )
    assert auth.transcript(nonce, client.node_id, server.node_id) == transcript

    vector = TRANSPORT_VECTORS["auth-client-proof"]
    proof = encoding_of(vector)
    observed = (vector["observed"][0], vector["observed"][1])
    assert auth.client_proof(client, nonce, server.node_id, observed) == proof
    assert auth.verify_client_proof_untrusted(proof, nonce, server.node_id) == (
        client.node_id,
        observed,
    )
    # The signature, checked with the documented key and transcript rather than the code.
    cert_len = int.from_bytes(proof[:2], "big")
    signature = proof[2 + cert_len : 2 + cert_len + 64]
    Ed25519PublicKey.from_public_bytes(client.public_key).verify(signature, transcript)
    assert proof[2 + cert_len + 64 :] == bytes([4, 192, 0, 2, 10]) + (7337).to_bytes(2, "big")


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_server_acceptance(family: str) -> None:
    vector = TRANSPORT_VECTORS[f"auth-server-accept-{family}"]
    accept = encoding_of(vector)
    observed = (vector["observed"][0], vector["observed"][1])
    assert auth.server_accept(observed) == accept
    assert auth.parse_accept_untrusted(accept) == observed
    for end in range(len(accept)):
        assert auth.parse_accept_untrusted(accept[:end]) is None


def control_message_of(name: str, fields: dict[str, Any]) -> control.ControlMessage:
    """The message a control vector names, from its plain fields."""
    if name == "register":
        return control.Register()
    if name in ("accept", "accept-circuit"):
        return control.Accept(bytes.fromhex(fields.get("circuit", "")))
    if name == "connect":
        return control.Connect(bytes.fromhex(fields["target"]))
    if name == "incoming":
        return control.Incoming(bytes.fromhex(fields["source"]), bytes.fromhex(fields["circuit"]))
    if name == "refuse":
        return control.Refuse(control.RefuseCode(fields["code"]), fields["reason"])
    if name in ("dial_back", "dial_back-host"):
        return control.DialBack(bytes.fromhex(fields["nonce"]), fields["port"], fields.get("host"))
    if name == "probed":
        return control.Probed()
    assert name == "candidates", name
    return control.Candidates(tuple((host, port) for host, port in fields["addresses"]))


def test_control_vectors_cover_every_frame_type() -> None:
    assert TRANSPORT["control_kinds"] == {k.name: f"{k:02x}" for k in control.ControlKind}
    names = {
        n.removeprefix("control-").split("-")[0]
        for n in TRANSPORT_VECTORS
        if n.startswith("control-")
    }
    assert names == {frame_type.name.lower() for frame_type in control.FrameType}


@pytest.mark.parametrize(
    "vector",
    [v for v in TRANSPORT["vectors"] if v["name"].startswith("control-")],
    ids=lambda v: v["name"],
)
def test_control_frame_vectors(vector: dict[str, Any]) -> None:
    frame = encoding_of(vector)
    message = control_message_of(vector["name"].removeprefix("control-"), vector["fields"])
    assert control.encode(message) == frame
    decoder = control.Decoder()
    decoder.feed(frame)
    assert decoder.next_untrusted() == message
    assert decoder.buffered == 0


def test_probe_datagram_vector() -> None:
    vector = TRANSPORT_VECTORS["probe-datagram"]
    nonce = bytes.fromhex(vector["fields"]["nonce"])
    assert control.probe_datagram(nonce) == encoding_of(vector)
    assert control.probe_nonce_untrusted(encoding_of(vector)) == nonce


# --- discovery keys, LAN beacons, DHT datagrams (vectors/discovery.json, DISCOVERY.md) -------

DISCOVERY = load("discovery.json")
DISCOVERY_VECTORS = {vector["name"]: vector for vector in DISCOVERY["vectors"]}


def derive(context: str, data: bytes, length: int = 32) -> str:
    return blake3.blake3(data, derive_key_context=context).digest()[:length].hex()


def test_discovery_keys() -> None:
    contexts, keys = DISCOVERY["contexts"], DISCOVERY["keys"]
    assert contexts == {
        "share_discovery_key": SHARE_KEY_CONTEXT,
        "mainline_info_hash": MAINLINE_KEY_CONTEXT,
        "private_dht_key": dht.DHT_KEY_CONTEXT,
        "private_dht_node_id": dht.DHT_NODE_ID_CONTEXT,
        "relays_key": RELAYS_KEY_CONTEXT,
        "relay_for_key": RELAY_FOR_KEY_CONTEXT,
    }
    assert relays_discovery_key().hex() == keys["relays_key"]
    assert derive(contexts["relays_key"], b"") == keys["relays_key"]
    relayed = bytes.fromhex(keys["relay_for_node_id"])
    assert relay_for_discovery_key(relayed).hex() == keys["relay_for_key"]
    assert derive(contexts["relay_for_key"], relayed) == keys["relay_for_key"]
    root = ContentHash(bytes.fromhex(keys["share_root"]))
    share_key = share_discovery_key(root)
    assert share_key.hex() == keys["share_discovery_key"]
    assert derive(contexts["share_discovery_key"], root) == keys["share_discovery_key"]
    assert keys["folder_discovery_key"] == FOLDER["keys"]["discovery_key"]
    for what in ("share", "folder"):
        key = bytes.fromhex(keys[f"{what}_discovery_key"])
        info_hash, dht_key = keys[f"{what}_mainline_info_hash"], keys[f"{what}_dht_key"]
        assert mainline_info_hash(key).hex() == info_hash
        assert derive(contexts["mainline_info_hash"], key, 20) == info_hash
        assert dht.dht_key(key).hex() == dht_key
        assert derive(contexts["private_dht_key"], key, 20) == dht_key
    for pair in DISCOVERY["dht_node_ids"]:
        node_id = bytes.fromhex(pair["node_id"])
        assert dht.dht_node_id(node_id).hex() == pair["dht_node_id"]
        assert derive(contexts["private_dht_node_id"], node_id, 20) == pair["dht_node_id"]


def beacon_of(doc: dict[str, Any]) -> Beacon:
    return Beacon(
        MessageType(doc["type"]),
        bytes.fromhex(doc["node_id"]),
        doc["instance"],
        doc["port"],
        tuple(bytes.fromhex(prefix) for prefix in doc["prefixes"]),
        doc["complete"],
    )


@pytest.mark.parametrize(
    "vector",
    [v for v in DISCOVERY["vectors"] if v["name"].startswith("beacon-")],
    ids=lambda v: v["name"],
)
def test_beacon_vectors(vector: dict[str, Any]) -> None:
    datagram = encoding_of(vector)
    message = beacon_of(vector["beacon"])
    assert message.to_wire() == datagram
    assert parse_beacon_untrusted(datagram) == message
    # Reserved trailing bytes are ignored (a later version may append fields).
    assert parse_beacon_untrusted(datagram + b"\x00\x01") == message


def test_beacons_cover_every_type_and_carry_key_prefixes() -> None:
    beacons = [beacon_of(v["beacon"]) for n, v in DISCOVERY_VECTORS.items() if "beacon" in v]
    assert {message.type for message in beacons} == set(MessageType)
    keys = DISCOVERY["keys"]
    held = {bytes.fromhex(keys[f"{what}_discovery_key"])[:8] for what in ("share", "folder")}
    assert set(DISCOVERY_VECTORS["beacon-announce"]["beacon"]["prefixes"]) == {
        prefix.hex() for prefix in held
    }


def dht_reply_parser(name: str) -> Any:
    parsers = {
        "dht-ping-reply": dht.ping_reply_untrusted,
        "dht-find-node-reply": dht.contacts_untrusted,
        "dht-get-providers-reply": dht.providers_reply_untrusted,
        "dht-get-providers-reply-truncated": dht.providers_reply_untrusted,
        "dht-add-provider-reply": dht.add_provider_reply_untrusted,
    }
    return parsers[name]


def dht_reply_of(name: str, body: Any) -> Any:
    """The value a reply's parser must give, built from the vector's plain body."""
    if name == "dht-find-node-reply":
        return tuple(dht.Contact(*contact) for contact in body)
    if name.startswith("dht-get-providers-reply"):
        return dht.ProvidersReply(
            body["token"],
            tuple(dht.Contact(*contact) for contact in body["nodes"]),
            tuple(dht.ProviderInfo(*provider) for provider in body["providers"]),
            body.get("truncated", False),
        )
    return body


def dht_reply_to_wire(value: Any) -> Any:
    if isinstance(value, dht.ProvidersReply):
        return value.to_wire()
    if isinstance(value, tuple):
        return [contact.to_wire() for contact in value]
    return value


def test_dht_vectors_cover_every_method_and_its_reply() -> None:
    methods = {
        from_json(v["body"])[0]
        for n, v in DISCOVERY_VECTORS.items()
        if n.startswith("dht-") and not n.endswith(("-reply", "-reply-truncated"))
    }
    assert methods == dht.METHODS
    for method in dht.METHODS:
        assert f"dht-{method.replace('_', '-')}-reply" in DISCOVERY_VECTORS


@pytest.mark.parametrize(
    "vector",
    [v for v in DISCOVERY["vectors"] if v["name"].startswith("dht-")],
    ids=lambda v: v["name"],
)
def test_dht_datagram_vectors(vector: dict[str, Any]) -> None:
    datagram = encoding_of(vector)
    msg_id = bytes.fromhex(vector["message_id"])
    body = from_json(vector["body"])
    decoded = dht.datagram_untrusted(datagram)
    if datagram[0] in (dht.REQUEST, dht.CLIENT_REQUEST):
        method, args = body
        client = datagram[0] == dht.CLIENT_REQUEST
        assert decoded == dht.Request(msg_id, method, tuple(args), client)
        assert dht.encode_request(msg_id, method, args, from_client=client) == datagram
        return
    assert decoded == dht.Response(msg_id, body)
    name = vector["name"]
    value = dht_reply_parser(name)(decoded.payload)
    assert value == dht_reply_of(name, body)
    assert dht.encode_response(msg_id, dht_reply_to_wire(value)) == datagram


def test_relay_datagram_vector() -> None:
    vector = TRANSPORT_VECTORS["relay-datagram"]
    encoded = encoding_of(vector)
    circuit = bytes.fromhex(vector["fields"]["circuit"])
    datagram = bytes.fromhex(vector["fields"]["datagram"])
    assert control.relay_datagram(circuit, datagram) == encoded
    assert control.parse_relay_datagram_untrusted(encoded) == (circuit, datagram)
    assert encoded[0] == control.RELAY_DATAGRAM and not encoded[0] & 0x40
