"""The client-authentication exchange, sans-I/O.

Neither qh3 nor aioquic lets a server request a TLS client certificate (aioquic has a
test-only flag, qh3 none), so the server learns the client's NodeId on the connection's first
server-initiated bidirectional stream:

    server -> client   nonce (32 random bytes)
    client -> server   u16 certificate length, certificate (DER), Ed25519 signature (64), FIN
    server -> client   0x01 (accepted), FIN         -- or CONNECTION_CLOSE with AUTH_FAILED

The signature covers CONTEXT || nonce || client NodeId || server NodeId. The nonce makes it
fresh; the server NodeId (pinned by the client, proven by TLS) stops a server from relaying
the proof to a third node; the context string keeps it from meaning anything elsewhere.
"""

from __future__ import annotations

from p2pfs.errors import AuthenticationError
from p2pfs.identity import (
    MAX_CERTIFICATE_LEN,
    SIGNATURE_LEN,
    Identity,
    NodeId,
    public_key_from_certificate_untrusted,
    verify_signature_untrusted,
)

CONTEXT = b"p2pfs/1 client authentication\x00"
NONCE_LEN = 32
ACCEPTED = b"\x01"
MAX_PROOF_LEN = 2 + MAX_CERTIFICATE_LEN + SIGNATURE_LEN


def transcript(nonce: bytes, client_id: NodeId, server_id: NodeId) -> bytes:
    return CONTEXT + nonce + client_id.raw + server_id.raw


def client_proof(identity: Identity, nonce: bytes, server_id: NodeId) -> bytes:
    """The client's answer to ``nonce``: its certificate and a signature binding both ends."""
    cert = identity.certificate_der
    signature = identity.sign(transcript(nonce, identity.node_id, server_id))
    return len(cert).to_bytes(2, "big") + cert + signature


def verify_client_proof_untrusted(proof: bytes, nonce: bytes, server_id: NodeId) -> NodeId:
    """The client's NodeId if ``proof`` answers ``nonce`` for ``server_id``, else
    AuthenticationError."""
    if len(proof) < 2 or len(proof) > MAX_PROOF_LEN:
        raise AuthenticationError(f"authentication proof of {len(proof)} bytes")
    cert_len = int.from_bytes(proof[:2], "big")
    if len(proof) != 2 + cert_len + SIGNATURE_LEN:
        raise AuthenticationError("authentication proof length mismatch")
    public_key = public_key_from_certificate_untrusted(proof[2 : 2 + cert_len])
    client_id = NodeId.from_public_key(public_key)
    verify_signature_untrusted(
        public_key, transcript(nonce, client_id, server_id), proof[2 + cert_len :]
    )
    return client_id
