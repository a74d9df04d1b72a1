"""A folder's key material, and what each key lets a member do.

One random 32-byte *write seed* is the folder's root secret. Everything else derives from
it, one way (BLAKE3 derive-key, Ed25519 key generation from a seed):

- the folder's Ed25519 *write key*: it signs every file record (:mod:`p2pfs.sync.records`),
  so only a holder of the seed can change the folder;
- the *read key*: proves membership on a connection (a MAC over both ends' nonces and
  NodeIds) and is all a read-only member holds besides the write key's public half;
- the *folder id*: names the folder on the wire and in the index; the discovery key is
  derived from it in turn, so a DHT observer learns neither.

A read-write ticket carries the seed; a read-only ticket carries the read key and the public
write key: enough to prove membership, verify records and relay them, and nothing more.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import blake3
import msgpack
import nacl.bindings
import nacl.exceptions

from p2pfs.errors import LocalProtocolError
from p2pfs.ids import ContentHash

SECRET_LEN = 32
PROOF_LEN = 32
NONCE_LEN = 32
READ_KEY_CONTEXT = "p2pfs 2026-11-22 folder read key v1"
WRITE_KEY_CONTEXT = "p2pfs 2026-11-22 folder write key v1"
FOLDER_ID_CONTEXT = "p2pfs 2026-11-22 folder id v1"
MEMBERSHIP_CONTEXT = "p2pfs 2026-11-22 folder membership proof v1"
DISCOVERY_CONTEXT = "p2pfs 2026-11-22 folder discovery key v1"
DEVICE_CONTEXT = "p2pfs 2026-11-22 folder device id v1"


@dataclass(frozen=True, slots=True)
class FolderKeys:
    """What one member holds: the read key and public write key always, the seed if rw."""

    read_key: bytes
    write_public: bytes
    write_seed: bytes | None = None

    def __post_init__(self) -> None:
        if len(self.read_key) != SECRET_LEN or len(self.write_public) != SECRET_LEN:
            raise LocalProtocolError("folder keys are 32 bytes each")
        if self.write_seed is not None and len(self.write_seed) != SECRET_LEN:
            raise LocalProtocolError("a folder's write seed is 32 bytes")

    @classmethod
    def from_write_seed(cls, seed: bytes) -> FolderKeys:
        if len(seed) != SECRET_LEN:
            raise LocalProtocolError("a folder's write seed is 32 bytes")
        read_key = blake3.blake3(seed, derive_key_context=READ_KEY_CONTEXT).digest()
        return cls(read_key, _signing_key(seed)[32:], seed)

    @property
    def writable(self) -> bool:
        return self.write_seed is not None

    def read_only(self) -> FolderKeys:
        return FolderKeys(self.read_key, self.write_public)

    @property
    def folder_id(self) -> ContentHash:
        material = self.read_key + self.write_public
        return ContentHash(blake3.blake3(material, derive_key_context=FOLDER_ID_CONTEXT).digest())

    @property
    def discovery_key(self) -> bytes:
        return blake3.blake3(self.folder_id, derive_key_context=DISCOVERY_CONTEXT).digest()

    def sign(self, message: bytes) -> bytes:
        if self.write_seed is None:
            raise LocalProtocolError("a read-only member cannot sign folder records")
        signed: bytes = nacl.bindings.crypto_sign(message, _signing_key(self.write_seed))
        return signed[: nacl.bindings.crypto_sign_BYTES]

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is the folder write key's over ``message``."""
        if len(signature) != nacl.bindings.crypto_sign_BYTES:
            return False
        try:
            nacl.bindings.crypto_sign_open(signature + message, self.write_public)
        except nacl.exceptions.BadSignatureError:
            return False
        return True

    def membership_proof(
        self, role: str, client_nonce: bytes, server_nonce: bytes, prover: bytes, verifier: bytes
    ) -> bytes:
        """The MAC a member sends to show it holds the read key, bound to this exchange.

        ``role`` ("client"/"server") keeps a reflected proof from passing; both nonces and
        both NodeIds bind it to one pair of authenticated endpoints and one exchange, so a
        relay that forwards it elsewhere gets nothing.
        """
        key = blake3.blake3(self.read_key, derive_key_context=MEMBERSHIP_CONTEXT).digest()
        material = msgpack.packb(
            [role, self.folder_id, client_nonce, server_nonce, prover, verifier],
            use_bin_type=True,
        )
        return blake3.blake3(material, key=key).digest()

    def check_proof(
        self,
        proof: bytes,
        role: str,
        client_nonce: bytes,
        server_nonce: bytes,
        prover: bytes,
        verifier: bytes,
    ) -> bool:
        expected = self.membership_proof(role, client_nonce, server_nonce, prover, verifier)
        return hmac.compare_digest(expected, proof)


_SIGNERS: dict[bytes, bytes] = {}


def _signing_key(seed: bytes) -> bytes:
    """libsodium's 64-byte secret key (Ed25519 seed, then public key) for a write seed.

    Records are signed and checked with libsodium rather than OpenSSL (``cryptography``):
    a check took 55 us against 106 us here, a signature 19 against 32 us, the same bytes.
    A join checks every record it is sent (50,000 at once for a folder of 50,000 files).
    """
    key = _SIGNERS.get(seed)
    if key is None:
        derived = blake3.blake3(seed, derive_key_context=WRITE_KEY_CONTEXT).digest()
        _public, key = nacl.bindings.crypto_sign_seed_keypair(derived)
        _SIGNERS[seed] = key
    return key


def device_id(node_id: bytes, join_nonce: bytes) -> bytes:
    """A membership's id in version vectors: one per (node, join), so a node that joins again
    (or lost its index) never passes its new files off as older than its own past edits."""
    return blake3.blake3(node_id + join_nonce, derive_key_context=DEVICE_CONTEXT).digest()
