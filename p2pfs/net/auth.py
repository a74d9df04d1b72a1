"""The client-authentication exchange, sans-I/O.

Neither qh3 nor aioquic lets a server request a TLS client certificate (aioquic has a
test-only flag, qh3 none), so the server learns the client's NodeId on the connection's first
server-initiated bidirectional stream:

    server -> client   nonce (32 random bytes), with the server's first flight
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

``ClientAuth`` and ``ServerAuth`` run the exchange as pure state machines (bytes in, bytes
to send and a result out; the nonce's randomness comes in as a parameter); the connection
only carries their bytes on the stream.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

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


# -- the exchange as two state machines -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The exchange succeeded: who the peer is and where it says it sees us."""

    peer: NodeId
    observed: Observed


@dataclass(frozen=True, slots=True)
class AuthStep:
    """What one input produced: bytes to send on the auth stream (then FIN) if any, and the
    result once the exchange is complete."""

    send: bytes = b""
    done: Authenticated | None = None


class ClientAuth:
    """The client's side: answer the server's nonce, then read its acceptance.

    ``server_id`` is the NodeId the TLS handshake proved; ``server_address`` where we
    dialled it. Every input error raises AuthenticationError.
    """

    def __init__(self, identity: Identity, server_id: NodeId, server_address: Observed) -> None:
        self._identity = identity
        self._server_id = server_id
        self._server_address = server_address
        self._buffer = bytearray()
        self._answered = False
        self._done = False

    def receive_untrusted(self, data: bytes, end_stream: bool) -> AuthStep:
        if self._done:
            return AuthStep()  # the server's trailing FIN
        self._buffer += data
        send = b""
        if not self._answered:
            if len(self._buffer) < NONCE_LEN:
                if end_stream:
                    raise AuthenticationError("server sent a truncated challenge")
                return AuthStep()
            nonce = bytes(self._buffer[:NONCE_LEN])
            del self._buffer[:NONCE_LEN]
            send = client_proof(self._identity, nonce, self._server_id, self._server_address)
            self._answered = True
        if len(self._buffer) > MAX_ACCEPT_LEN:
            raise AuthenticationError("oversized acceptance")
        observed = parse_accept_untrusted(bytes(self._buffer))
        if observed is None:
            if end_stream:
                raise AuthenticationError("server sent a truncated acceptance")
            return AuthStep(send=send)
        self._done = True
        return AuthStep(send=send, done=Authenticated(self._server_id, observed))


class ServerAuth:
    """The server's side: send ``nonce`` (fresh randomness, given by the caller), collect
    the client's proof up to its FIN, verify it, accept.

    ``client_address`` is where the client's packets come from. Every input error raises
    AuthenticationError.
    """

    def __init__(self, server_id: NodeId, nonce: bytes, client_address: Observed) -> None:
        if len(nonce) != NONCE_LEN:
            raise ValueError(f"nonce must be {NONCE_LEN} bytes")
        self._server_id = server_id
        self.challenge = nonce
        self._client_address = client_address
        self._buffer = bytearray()
        self._done = False

    def receive_untrusted(self, data: bytes, end_stream: bool) -> AuthStep:
        if self._done:
            return AuthStep()
        self._buffer += data
        if len(self._buffer) > MAX_PROOF_LEN:
            raise AuthenticationError("oversized authentication proof")
        if not end_stream:
            return AuthStep()
        client_id, observed = verify_client_proof_untrusted(
            bytes(self._buffer), self.challenge, self._server_id
        )
        self._buffer.clear()
        self._done = True
        return AuthStep(
            send=server_accept(self._client_address), done=Authenticated(client_id, observed)
        )
