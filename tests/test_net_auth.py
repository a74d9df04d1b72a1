"""The client-authentication exchange (net/auth.py) as two pure state machines."""

from __future__ import annotations

import itertools
import warnings

import pytest
from cryptography.utils import CryptographyDeprecationWarning
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.errors import AuthenticationError
from p2pfs.identity import Identity
from p2pfs.net import auth

CLIENT_ID, SERVER_ID = Identity.generate(), Identity.generate()
CLIENT_AT, SERVER_AT = ("198.51.100.7", 40001), ("203.0.113.9", 4433)
NONCE = bytes(range(32))


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at ``cuts`` (positions, any order, duplicates allowed)."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


def feed(
    machine: auth.ClientAuth | auth.ServerAuth, data: bytes, cuts: list[int]
) -> tuple[bytes, auth.Authenticated | None]:
    """Deliver ``data`` then FIN in pieces; what the machine sent and its result."""
    sent, done = b"", None
    parts = pieces(data, cuts)
    for i, part in enumerate(parts):
        step = machine.receive_untrusted(part, end_stream=i == len(parts) - 1)
        sent += step.send
        done = done or step.done
    return sent, done


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 400), max_size=5), st.lists(st.integers(0, 400), max_size=5))
def test_exchange_in_any_fragmentation_authenticates_both(
    cuts_up: list[int], cuts_down: list[int]
) -> None:
    server = auth.ServerAuth(SERVER_ID.node_id, NONCE, CLIENT_AT)
    client = auth.ClientAuth(CLIENT_ID, SERVER_ID.node_id, SERVER_AT)
    # The nonce arrives without FIN (the server's FIN comes after its acceptance).
    proof = b""
    for part in pieces(server.challenge, cuts_down):
        step = client.receive_untrusted(part, end_stream=False)
        proof += step.send
        assert step.done is None
    accept, server_done = feed(server, proof, cuts_up)
    _, client_done = feed(client, accept, cuts_down)
    assert server_done == auth.Authenticated(CLIENT_ID.node_id, SERVER_AT)
    assert client_done == auth.Authenticated(SERVER_ID.node_id, CLIENT_AT)


def client_proof_for(server_id: Identity = SERVER_ID) -> bytes:
    client = auth.ClientAuth(CLIENT_ID, server_id.node_id, SERVER_AT)
    return client.receive_untrusted(NONCE, end_stream=False).send


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 255))
def test_a_flipped_byte_in_the_proof_is_refused_or_changes_nothing(
    position: int, flip: int
) -> None:
    # Only the certificate's key is trusted (certs.py): a flip elsewhere in it (a serial
    # bit, a name) may leave the same proven identity; anything else must be refused with
    # AuthenticationError, never another exception and never another identity.
    proof = bytearray(client_proof_for())
    position %= len(proof)
    proof[position] ^= flip
    server = auth.ServerAuth(SERVER_ID.node_id, NONCE, CLIENT_AT)
    with warnings.catch_warnings():
        # A flipped serial sign bit: cryptography warns that it will refuse such
        # certificates in a future release (then it raises, which we map).
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            step = server.receive_untrusted(bytes(proof), end_stream=True)
        except AuthenticationError:
            return
    assert step.done is not None
    assert step.done.peer == CLIENT_ID.node_id


def test_proof_for_another_server_or_nonce_is_refused() -> None:
    # A server cannot relay a client's proof to a third node, nor replay it later.
    relayed = client_proof_for(Identity.generate())
    with pytest.raises(AuthenticationError):
        auth.ServerAuth(SERVER_ID.node_id, NONCE, CLIENT_AT).receive_untrusted(relayed, True)
    other_nonce = auth.ServerAuth(SERVER_ID.node_id, bytes(32), CLIENT_AT)
    with pytest.raises(AuthenticationError):
        other_nonce.receive_untrusted(client_proof_for(), True)


def test_truncated_and_oversized_inputs_fail_at_once() -> None:
    with pytest.raises(AuthenticationError, match="truncated challenge"):
        auth.ClientAuth(CLIENT_ID, SERVER_ID.node_id, SERVER_AT).receive_untrusted(
            NONCE[:10], end_stream=True
        )
    client = auth.ClientAuth(CLIENT_ID, SERVER_ID.node_id, SERVER_AT)
    client.receive_untrusted(NONCE, end_stream=False)
    with pytest.raises(AuthenticationError, match="truncated acceptance"):
        client.receive_untrusted(auth.ACCEPTED, end_stream=True)
    server = auth.ServerAuth(SERVER_ID.node_id, NONCE, CLIENT_AT)
    # Oversized is refused before FIN: a peer cannot make the server buffer without bound.
    with pytest.raises(AuthenticationError, match="oversized"):
        server.receive_untrusted(bytes(auth.MAX_PROOF_LEN + 1), end_stream=False)
    refusal = auth.ClientAuth(CLIENT_ID, SERVER_ID.node_id, SERVER_AT)
    with pytest.raises(AuthenticationError, match="did not accept"):
        refusal.receive_untrusted(NONCE + b"\x00", end_stream=False)
