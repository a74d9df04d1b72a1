"""Vector makers for what crosses between nodes outside request streams: tickets, NodeId text,
the client authentication exchange, control (relay and punch) frames, LAN beacons, the private
DHT's datagrams and the discovery keys. Run through make_vectors.py."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import blake3
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from vectorlib import Pieces, annotate, joined, pieces_vector, pseudo_random, to_json

from p2pfs.address import PeerAddress
from p2pfs.discovery import beacon
from p2pfs.discovery.beacon import Beacon, MessageType
from p2pfs.discovery.dht import messages as dht
from p2pfs.discovery.dht.messages import Contact, ProviderInfo, ProvidersReply
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
from p2pfs.identity import Identity
from p2pfs.ids import ContentHash, NodeId
from p2pfs.net import auth, control
from p2pfs.sync.keys import FolderKeys
from p2pfs.wire.ticket import RelayHint, Ticket, TicketKind

# --- shared fixed inputs --------------------------------------------------------------------

SHARE_ROOT = ContentHash(pseudo_random("share root", 32))
FOLDER_SEED = pseudo_random("folder write seed", 32)  # the seed of vectors/folder.json


def identity_from_seed(label: str) -> tuple[bytes, Identity]:
    seed = pseudo_random(label, 32)
    return seed, Identity.from_private_key(Ed25519PrivateKey.from_private_bytes(seed))


CLIENT_SEED, CLIENT = identity_from_seed("client node key")
SERVER_SEED, SERVER = identity_from_seed("server node key")
RELAY_SEED, RELAY = identity_from_seed("relay node key")
CIRCUIT = pseudo_random("relay circuit id", control.CIRCUIT_LEN)
NONCE = pseudo_random("dial-back nonce", control.NONCE_LEN)


def address_pieces(host: str, port: int, label: str) -> Pieces:
    ip = ipaddress.ip_address(host)
    return [
        [f"{ip.version:02x}", f"{label}: family {ip.version} (IPv{ip.version})"],
        [ip.packed.hex(), f"{label}: IP {host}"],
        [port.to_bytes(2, "big").hex(), f"{label}: port {port} (u16 big-endian)"],
    ]


# --- tickets --------------------------------------------------------------------------------


def ticket_fields(ticket: Ticket) -> list[Any]:
    """The payload array as WIRE.md (Tickets) spells it, built here rather than by the codec."""
    fields: list[Any] = [
        int(ticket.kind),
        bytes(ticket.root),
        None if ticket.node_id is None else ticket.node_id.raw,
        [[a.host, a.port] for a in ticket.addresses],
    ]
    if ticket.write_public is not None or ticket.relays:
        fields.append(ticket.write_public)
    if ticket.relays:
        fields.append([[r.node_id.raw, r.address.host, r.address.port] for r in ticket.relays])
    return fields


def ticket_json(ticket: Ticket) -> dict[str, Any]:
    return {
        "kind": int(ticket.kind),
        "root": bytes(ticket.root).hex(),
        "node_id": ticket.node_id.raw.hex() if ticket.node_id else None,
        "addresses": [[a.host, a.port] for a in ticket.addresses],
        "write_public": ticket.write_public.hex() if ticket.write_public else None,
        "relays": [[r.node_id.raw.hex(), r.address.host, r.address.port] for r in ticket.relays],
    }


def ticket_vector(name: str, description: str, ticket: Ticket) -> dict[str, Any]:
    payload = msgpack.packb(ticket_fields(ticket), use_bin_type=True)
    checksum = blake3.blake3(payload).digest()[:4]
    text = "p2pfs1" + base64.b32encode(payload + checksum).decode().rstrip("=").lower()
    assert ticket.encode() == text, name
    vector = pieces_vector(name, description, annotate(ticket_fields(ticket), "payload"), payload)
    vector["ticket"] = ticket_json(ticket)
    vector["checksum"] = checksum.hex()
    vector["text"] = text
    return vector


def ticket_vectors() -> dict[str, Any]:
    keys = FolderKeys.from_write_seed(FOLDER_SEED)
    node = SERVER.node_id
    home = (PeerAddress("192.0.2.1", 7337), PeerAddress("2001:db8::1", 7337))
    relays = (
        RelayHint(RELAY.node_id, PeerAddress("203.0.113.5", 7337)),
        RelayHint(CLIENT.node_id, PeerAddress("2001:db8:5::9", 443)),
    )
    share, rw, ro = TicketKind.SHARE, TicketKind.FOLDER_RW, TicketKind.FOLDER_RO
    read_key, public = ContentHash(keys.read_key), keys.write_public
    seed = ContentHash(FOLDER_SEED)
    examples = [
        (
            "share-bare",
            "a share made with --no-hints: root only",
            Ticket(share, SHARE_ROOT, None, ()),
        ),
        (
            "share-node",
            "a share naming its node, no addresses",
            Ticket(share, SHARE_ROOT, node, ()),
        ),
        (
            "share-addresses",
            "a share with its node and an IPv4 and an IPv6 address",
            Ticket(share, SHARE_ROOT, node, home),
        ),
        (
            "share-relays",
            "a share with relays: nil in the write-key place, then [relay_node_id, host, port]",
            Ticket(share, SHARE_ROOT, node, home[:1], relays=relays),
        ),
        (
            "folder-rw",
            "read-write folder membership: root = the folder's write seed (vectors/folder.json)",
            Ticket(rw, seed, node, home[:1]),
        ),
        (
            "folder-rw-relays",
            "read-write folder membership with one relay",
            Ticket(rw, seed, node, (), relays=relays[:1]),
        ),
        (
            "folder-ro",
            "read-only folder membership: root = read key, fifth element = write_public",
            Ticket(ro, read_key, node, home, public),
        ),
        (
            "folder-ro-bare",
            "read-only folder membership made with --no-hints",
            Ticket(ro, read_key, None, (), public),
        ),
        (
            "folder-ro-relays",
            "read-only folder membership with relays after the write key",
            Ticket(ro, read_key, node, home[1:], public, relays),
        ),
    ]
    return {
        "format_version": 1,
        "vectors": [ticket_vector(name, text, ticket) for name, text, ticket in examples],
    }


# --- NodeIds, authentication, control frames ------------------------------------------------


def identity_json(seed: bytes, identity: Identity) -> dict[str, str]:
    return {
        "ed25519_seed": seed.hex(),
        "public_key": identity.public_key.hex(),
        "node_id": identity.node_id.raw.hex(),
        "node_id_text": str(identity.node_id),
    }


def node_id_texts() -> list[dict[str, str]]:
    raws = {"zero": bytes(32), "ones": b"\xff" * 32, "counting": bytes(range(32))}
    return [
        {"name": name, "node_id": raw.hex(), "text": str(NodeId(raw))} for name, raw in raws.items()
    ]


def rejected_node_id_texts() -> list[dict[str, str]]:
    canonical = str(NodeId(b"\xff" * 32))
    return [
        {"text": canonical[:-1] + "7", "why": "the 4 spare bits of the last character are set"},
        {"text": canonical.upper(), "why": "upper case"},
        {"text": canonical[:-1], "why": "51 characters"},
        {"text": canonical + "=", "why": "padding"},
        {"text": canonical[:-1] + "1", "why": "'1' is not in the base32 alphabet"},
    ]


def auth_vectors() -> list[dict[str, Any]]:
    nonce = pseudo_random("auth nonce", auth.NONCE_LEN)
    observed_server = ("192.0.2.10", 7337)
    transcript = auth.transcript(nonce, CLIENT.node_id, SERVER.node_id)
    transcript_pieces = [
        [auth.CONTEXT.hex(), f"context {auth.CONTEXT.decode()!r}"],
        [nonce.hex(), "nonce (32 bytes, from the server)"],
        [CLIENT.node_id.raw.hex(), "client NodeId"],
        [SERVER.node_id.raw.hex(), "server NodeId"],
    ]
    proof = auth.client_proof(CLIENT, nonce, SERVER.node_id, observed_server)
    cert = CLIENT.certificate_der
    proof_pieces = [
        [len(cert).to_bytes(2, "big").hex(), f"certificate length {len(cert)} (u16 big-endian)"],
        [cert.hex(), "client certificate (DER; only its Ed25519 key is used)"],
        [CLIENT.sign(transcript).hex(), "Ed25519 signature over the transcript (64 bytes)"],
        *address_pieces(*observed_server, "observed server address"),
    ]
    vectors = [
        {"name": "auth-nonce", "description": "server -> client", "nonce": nonce.hex()},
        pieces_vector(
            "auth-transcript", "the bytes the client signs", transcript_pieces, transcript
        ),
        pieces_vector("auth-client-proof", "client -> server, then FIN", proof_pieces, proof),
    ]
    vectors[-1]["observed"] = list(observed_server)
    for family, observed in (("v4", ("198.51.100.7", 40123)), ("v6", ("2001:db8::7", 40123))):
        accept = auth.server_accept(observed)
        pieces = [
            ["01", "accepted"],
            *address_pieces(*observed, "observed client address"),
        ]
        vector = pieces_vector(
            f"auth-server-accept-{family}", "server -> client, then FIN", pieces, accept
        )
        vector["observed"] = list(observed)
        vectors.append(vector)
    return vectors


def control_vectors() -> list[dict[str, Any]]:
    candidates = (("192.0.2.1", 7337), ("2001:db8::1", 7338))
    examples: list[tuple[str, control.ControlMessage, Any, Pieces]] = [
        ("register", control.Register(), {}, []),
        (
            "connect",
            control.Connect(SERVER.node_id.raw),
            {"target": SERVER.node_id.raw.hex()},
            [[SERVER.node_id.raw.hex(), "target NodeId"]],
        ),
        (
            "incoming",
            control.Incoming(CLIENT.node_id.raw, CIRCUIT),
            {"source": CLIENT.node_id.raw.hex(), "circuit": CIRCUIT.hex()},
            [[CLIENT.node_id.raw.hex(), "source NodeId"], [CIRCUIT.hex(), "circuit id"]],
        ),
        ("accept", control.Accept(), {}, []),
        (
            "accept-circuit",
            control.Accept(CIRCUIT),
            {"circuit": CIRCUIT.hex()},
            [[CIRCUIT.hex(), "circuit id (the relay's answer to CONNECT)"]],
        ),
        (
            "refuse",
            control.Refuse(control.RefuseCode.NOT_REGISTERED, "not registered here"),
            {"code": 2, "reason": "not registered here"},
            [["02", "code 2 NOT_REGISTERED"], [b"not registered here".hex(), "reason (UTF-8)"]],
        ),
        (
            "dial_back",
            control.DialBack(NONCE, 7337),
            {"nonce": NONCE.hex(), "port": 7337},
            [[NONCE.hex(), "nonce (16 bytes)"], ["1ca9", "port 7337 (u16 big-endian)"]],
        ),
        (
            "dial_back-host",
            control.DialBack(NONCE, 7337, "2001:db8::1"),
            {"nonce": NONCE.hex(), "port": 7337, "host": "2001:db8::1"},
            [
                [NONCE.hex(), "nonce (16 bytes)"],
                ["1ca9", "port 7337 (u16 big-endian)"],
                ["20010db8000000000000000000000001", "IPv6 address 2001:db8::1 (16 bytes)"],
            ],
        ),
        ("probed", control.Probed(), {}, []),
        (
            "candidates",
            control.Candidates(candidates),
            {"addresses": [list(c) for c in candidates]},
            [
                ["02", "count 2"],
                *address_pieces(*candidates[0], "candidate 0"),
                *address_pieces(*candidates[1], "candidate 1"),
            ],
        ),
    ]
    vectors = []
    for name, message, fields, body in examples:
        kind = control.FrameType[name.split("-")[0].upper()]
        encoded = control.encode(message)
        length = 1 + len(bytes.fromhex(joined(body)))
        pieces = [
            [length.to_bytes(2, "big").hex(), f"length {length} (u16 big-endian: type + body)"],
            [f"{kind:02x}", f"type 0x{kind:02x} {kind.name}"],
            *body,
        ]
        vector = pieces_vector(f"control-{name}", f"control frame {kind.name}", pieces, encoded)
        vector["fields"] = fields
        vectors.append(vector)
    return vectors


def relay_datagram_vectors() -> list[dict[str, Any]]:
    datagram = pseudo_random("relayed datagram", 24)
    pieces = [
        ["03", "relay datagram (first byte on the node's UDP port)"],
        [CIRCUIT.hex(), "circuit id"],
        [datagram.hex(), "one end-to-end QUIC datagram (forwarded unread)"],
    ]
    encoded = control.relay_datagram(CIRCUIT, datagram)
    vector = pieces_vector("relay-datagram", "a datagram through a relay circuit", pieces, encoded)
    vector["fields"] = {"circuit": CIRCUIT.hex(), "datagram": datagram.hex()}
    return [vector]


def probe_datagram_vectors() -> list[dict[str, Any]]:
    pieces = [
        ["05", "dial-back probe (first byte on the node's UDP port)"],
        [NONCE.hex(), "the asker's nonce, echoed"],
    ]
    encoded = control.probe_datagram(NONCE)
    vector = pieces_vector("probe-datagram", "a dial-back probe", pieces, encoded)
    vector["fields"] = {"nonce": NONCE.hex()}
    return [vector]


def transport_vectors() -> dict[str, Any]:
    return {
        "identities": {
            "client": identity_json(CLIENT_SEED, CLIENT),
            "server": identity_json(SERVER_SEED, SERVER),
            "relay": identity_json(RELAY_SEED, RELAY),
        },
        "node_id_texts": node_id_texts(),
        "rejected_node_id_texts": rejected_node_id_texts(),
        "control_kinds": {kind.name: f"{kind:02x}" for kind in control.ControlKind},
        "vectors": auth_vectors()
        + control_vectors()
        + relay_datagram_vectors()
        + probe_datagram_vectors(),
    }


# --- discovery: keys, LAN beacons, DHT datagrams --------------------------------------------


def beacon_json(message: Beacon) -> dict[str, Any]:
    return {
        "type": int(message.type),
        "node_id": message.node_id.hex(),
        "instance": message.instance,
        "port": message.port,
        "prefixes": [p.hex() for p in message.prefixes],
        "complete": message.complete,
    }


def beacon_vector(name: str, description: str, message: Beacon) -> dict[str, Any]:
    pieces = [
        [beacon.MAGIC.hex(), "magic 'p2LD'"],
        [f"{beacon.VERSION:02x}", f"version {beacon.VERSION}"],
        [f"{message.type:02x}", f"type {int(message.type)} {message.type.name}"],
        [f"{int(message.complete):02x}", f"flags (bit 0 COMPLETE = {message.complete})"],
        [message.node_id.hex(), "sender NodeId"],
        [message.instance.to_bytes(8, "big").hex(), f"instance {message.instance} (u64)"],
        [message.port.to_bytes(2, "big").hex(), f"port {message.port} (u16)"],
        [f"{len(message.prefixes):02x}", f"prefix count {len(message.prefixes)}"],
        *[[p.hex(), f"key prefix {i} (8 bytes)"] for i, p in enumerate(message.prefixes)],
    ]
    vector = pieces_vector(name, description, pieces, message.to_wire())
    vector["beacon"] = beacon_json(message)
    return vector


def beacon_vectors(share_key: bytes, folder_key: bytes) -> list[dict[str, Any]]:
    node = SERVER.node_id.raw
    instance = int.from_bytes(pseudo_random("beacon instance", 8), "big")
    prefixes = tuple(sorted(beacon.key_prefix(k) for k in (share_key, folder_key)))
    asked = (beacon.key_prefix(share_key),)
    return [
        beacon_vector(
            "beacon-announce",
            "ANNOUNCE of a node's whole key set (a share and a folder)",
            Beacon(MessageType.ANNOUNCE, node, instance, 7337, prefixes, complete=True),
        ),
        beacon_vector(
            "beacon-announce-window",
            "ANNOUNCE of one window of a larger key set (COMPLETE clear)",
            Beacon(MessageType.ANNOUNCE, node, instance, 7337, prefixes[:1]),
        ),
        beacon_vector(
            "beacon-query",
            "QUERY for the share's key (port 0)",
            Beacon(MessageType.QUERY, CLIENT.node_id.raw, 1, 0, asked),
        ),
        beacon_vector(
            "beacon-answer",
            "ANSWER naming the held keys that were asked",
            Beacon(MessageType.ANSWER, node, instance, 7337, asked),
        ),
    ]


def dht_vector(name: str, description: str, encoded: bytes) -> dict[str, Any]:
    kind = {
        dht.REQUEST: "request",
        dht.CLIENT_REQUEST: "request from a node in client mode",
        dht.RESPONSE: "response",
    }[encoded[0]]
    body = msgpack.unpackb(encoded[dht.HEADER_LEN :], raw=False)
    pieces = [
        [f"{encoded[0]:02x}", f"{encoded[0]} = {kind}"],
        [encoded[1 : dht.HEADER_LEN].hex(), "message id (20 bytes)"],
        *annotate(body, "body"),
    ]
    vector = pieces_vector(name, description, pieces, encoded)
    vector["message_id"] = encoded[1 : dht.HEADER_LEN].hex()
    vector["body"] = to_json(body)
    return vector


def dht_vectors(share_key: bytes) -> list[dict[str, Any]]:
    asker, answerer = dht.dht_node_id(CLIENT.node_id.raw), dht.dht_node_id(SERVER.node_id.raw)
    key = dht.dht_key(share_key)
    token = pseudo_random("write token", 16)
    ids = [pseudo_random(f"dht message {i}", dht.MSG_ID_LEN) for i in range(6)]
    provider = ProviderInfo(SERVER.node_id.raw, "192.0.2.1", 7337, 1799)
    contacts = (Contact(answerer, "192.0.2.1", 7338), Contact(asker, "2001:db8::2", 7338))
    full = ProvidersReply(token, contacts[:1], (provider,))
    trimmed = ProvidersReply(token, (), (), truncated=True)
    request, response = dht.encode_request, dht.encode_response
    return [
        dht_vector("dht-ping", "ping [sender_id]", request(ids[0], "ping", [asker])),
        dht_vector("dht-ping-reply", "the answerer's id", response(ids[0], answerer)),
        dht_vector(
            "dht-find-node", "find_node without a token", request(ids[1], "find_node", [asker, key])
        ),
        dht_vector(
            "dht-find-node-client",
            "find_node from a node in client mode: answered, its sender added to no table",
            request(ids[1], "find_node", [asker, key], from_client=True),
        ),
        dht_vector(
            "dht-find-node-token",
            "find_node echoing the token the asked node gave this requester",
            request(ids[2], "find_node", [asker, key, token]),
        ),
        dht_vector(
            "dht-find-node-reply",
            "contacts [id, ip, port], nearest first",
            response(ids[2], dht.contacts_to_wire(contacts)),
        ),
        dht_vector(
            "dht-get-providers",
            "get_providers without a token",
            request(ids[3], "get_providers", [asker, key]),
        ),
        dht_vector(
            "dht-get-providers-reply-truncated",
            "a reply to a requester without a valid token, trimmed to the amplification budget",
            response(ids[3], trimmed.to_wire()),
        ),
        dht_vector(
            "dht-get-providers-token",
            "get_providers echoing the token",
            request(ids[4], "get_providers", [asker, key, token]),
        ),
        dht_vector(
            "dht-get-providers-reply",
            "token, nodes, providers [node_id, ip, port, ttl seconds left]",
            response(ids[4], full.to_wire()),
        ),
        dht_vector(
            "dht-add-provider",
            "add_provider [sender_id, key, token, provider NodeId, port, ttl]",
            request(ids[5], "add_provider", [asker, key, token, SERVER.node_id.raw, 7337, 1800]),
        ),
        dht_vector("dht-add-provider-reply", "accepted", response(ids[5], True)),
    ]


def discovery_vectors() -> dict[str, Any]:
    share_key = share_discovery_key(SHARE_ROOT)
    folder_key = FolderKeys.from_write_seed(FOLDER_SEED).discovery_key
    return {
        "contexts": {
            "share_discovery_key": SHARE_KEY_CONTEXT,
            "mainline_info_hash": MAINLINE_KEY_CONTEXT,
            "private_dht_key": dht.DHT_KEY_CONTEXT,
            "private_dht_node_id": dht.DHT_NODE_ID_CONTEXT,
            "relays_key": RELAYS_KEY_CONTEXT,
            "relay_for_key": RELAY_FOR_KEY_CONTEXT,
        },
        "keys": {
            "share_root": bytes(SHARE_ROOT).hex(),
            "share_discovery_key": share_key.hex(),
            "share_mainline_info_hash": mainline_info_hash(share_key).hex(),
            "share_dht_key": dht.dht_key(share_key).hex(),
            "folder_discovery_key": folder_key.hex(),
            "folder_mainline_info_hash": mainline_info_hash(folder_key).hex(),
            "folder_dht_key": dht.dht_key(folder_key).hex(),
            "relays_key": relays_discovery_key().hex(),
            "relay_for_node_id": SERVER.node_id.raw.hex(),
            "relay_for_key": relay_for_discovery_key(SERVER.node_id.raw).hex(),
        },
        "dht_node_ids": [
            {
                "node_id": ident.node_id.raw.hex(),
                "dht_node_id": dht.dht_node_id(ident.node_id.raw).hex(),
            }
            for ident in (CLIENT, SERVER)
        ],
        "vectors": beacon_vectors(share_key, folder_key) + dht_vectors(share_key),
    }
