"""The client-authentication exchange, sans-I/O.

Neither qh3 nor aioquic lets a server request a TLS client certificate (aioquic has a
test-only flag, qh3 none), so the server learns the client's NodeId on the connection's first
server-initiated bidirectional stream:

    server -> client   nonce (32 random bytes)
    client -> server   u16 certificate length, certificate (DER), Ed25519 signature (64),
                       observed address, FIN
    server -> client   0x01 (accepted), observed address, FIN
                                                -- or CONNECTION_CLOSE with AUTH_FAILED

The signature covers CONTEXT || nonce || client NodeId || server NodeId. The nonce makes it
fresh; the server NodeId (pinned by the client, proven by TLS) stops a server from relaying
the proof to a third node; the context string keeps it from meaning anything elsewhere.

An observed address is the address each side sees the other's packets come from (the
client: the address it dialled), ``family (4 | 6) || IP (4 | 16 bytes) || u16 port``, so a
node behind a NAT learns its public mapping. It rides inside the TLS-protected connection;
what a peer says of us is still only its word, so the node trusts it as the address book
says (bounded, and confirmed by more than one peer before it goes into tickets).
"""

from __future__ import annotations

import ipaddress

from p2pfs.certs import (
    MAX_CERTIFICATE_LEN,
    SIGNATURE_LEN,
    public_key_from_certificate_untrusted,
    verify_signature_untrusted,
)
from p2pfs.errors import AuthenticationError
from p2pfs.identity import Identity
from p2pfs.ids import NodeId

CONTEXT = b"p2pfs/1 client authentication\x00"
NONCE_LEN = 32
ACCEPTED = b"\x01"
MAX_ADDRESS_LEN = 1 + 16 + 2
MAX_PROOF_LEN = 2 + MAX_CERTIFICATE_LEN + SIGNATURE_LEN + MAX_ADDRESS_LEN
MAX_ACCEPT_LEN = len(ACCEPTED) + MAX_ADDRESS_LEN

Observed = tuple[str, int]


def encode_address(host: str, port: int) -> bytes:
    ip = ipaddress.ip_address(host)
    return bytes([ip.version]) + ip.packed + port.to_bytes(2, "big")


def address_length_untrusted(first: int) -> int:
    """The encoded length of an address starting with family byte ``first``."""
    if first == 4:
        return 1 + 4 + 2
    if first == 6:
        return 1 + 16 + 2
    raise AuthenticationError(f"observed address of unknown family {first}")


def decode_address_untrusted(data: bytes) -> Observed:
    if not data or len(data) != address_length_untrusted(data[0]):
        raise AuthenticationError("malformed observed address")
    host = str(ipaddress.ip_address(data[1:-2]))
    port = int.from_bytes(data[-2:], "big")
    if port == 0:
        raise AuthenticationError("observed address with port 0")
    return host, port


def server_accept(observed_client: Observed) -> bytes:
    return ACCEPTED + encode_address(*observed_client)


def parse_accept_untrusted(buffer: bytes) -> Observed | None:
    """The server's acceptance and the address it sees us at, or None while incomplete."""
    if not buffer:
        return None
    if buffer[:1] != ACCEPTED:
        raise AuthenticationError("server did not accept our proof")
    if len(buffer) < 2:
        return None
    wanted = len(ACCEPTED) + address_length_untrusted(buffer[1])
    if len(buffer) < wanted:
        return None
    if len(buffer) > wanted:
        raise AuthenticationError("trailing bytes after the server's acceptance")
    return decode_address_untrusted(buffer[1:])


def transcript(nonce: bytes, client_id: NodeId, server_id: NodeId) -> bytes:
    return CONTEXT + nonce + client_id.raw + server_id.raw


def client_proof(
    identity: Identity, nonce: bytes, server_id: NodeId, observed_server: Observed
) -> bytes:
    """The client's answer to ``nonce``: its certificate and a signature binding both ends,
    then the address it reached the server at."""
    cert = identity.certificate_der
    signature = identity.sign(transcript(nonce, identity.node_id, server_id))
    return len(cert).to_bytes(2, "big") + cert + signature + encode_address(*observed_server)


def verify_client_proof_untrusted(
    proof: bytes, nonce: bytes, server_id: NodeId
) -> tuple[NodeId, Observed]:
    """The client's NodeId and the address it says it reached us at, if ``proof`` answers
    ``nonce`` for ``server_id``, else AuthenticationError."""
    if len(proof) < 2 or len(proof) > MAX_PROOF_LEN:
        raise AuthenticationError(f"authentication proof of {len(proof)} bytes")
    cert_len = int.from_bytes(proof[:2], "big")
    signed_end = 2 + cert_len + SIGNATURE_LEN
    if len(proof) <= signed_end:
        raise AuthenticationError("authentication proof length mismatch")
    observed = decode_address_untrusted(proof[signed_end:])
    public_key = public_key_from_certificate_untrusted(proof[2 : 2 + cert_len])
    client_id = NodeId.from_public_key(public_key)
    verify_signature_untrusted(
        public_key, transcript(nonce, client_id, server_id), proof[2 + cert_len : signed_end]
    )
    return client_id, observed
