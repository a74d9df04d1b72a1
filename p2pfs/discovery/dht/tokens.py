"""Write tokens (sans-I/O): proof that an announcer can receive at the address it announces.

As BEP 5 does: a ``get_providers`` reply carries a token computed from the requester's IP and
port and a secret; ``add_provider`` is accepted only with a token that matches the sender's
address under the current or the previous secret. Secrets rotate every ``rotation`` seconds,
so a token lives between one and two rotations (5-10 minutes by default). Time and the new
secrets are passed in by the caller.
"""

from __future__ import annotations

import hmac
import ipaddress

import blake3

TOKEN_LEN = 16
SECRET_LEN = 32
DEFAULT_ROTATION = 300.0


def _address_bytes(ip: str, port: int) -> bytes:
    return ipaddress.ip_address(ip).packed + port.to_bytes(2, "big")


class WriteTokens:
    def __init__(self, *, secret: bytes, now: float, rotation: float = DEFAULT_ROTATION) -> None:
        if len(secret) != SECRET_LEN:
            raise ValueError(f"a token secret is {SECRET_LEN} bytes")
        self._current = secret
        self._previous = secret
        self._rotated_at = now
        self.rotation = rotation

    def needs_rotation(self, now: float) -> bool:
        return now - self._rotated_at >= self.rotation

    def rotate(self, secret: bytes, now: float) -> None:
        """The current secret becomes the previous one; tokens under the older one die."""
        if len(secret) != SECRET_LEN:
            raise ValueError(f"a token secret is {SECRET_LEN} bytes")
        self._previous, self._current = self._current, secret
        self._rotated_at = now

    @staticmethod
    def _token(secret: bytes, ip: str, port: int) -> bytes:
        return blake3.blake3(_address_bytes(ip, port), key=secret).digest()[:TOKEN_LEN]

    def issue(self, ip: str, port: int) -> bytes:
        return self._token(self._current, ip, port)

    def verify(self, token: bytes, ip: str, port: int) -> bool:
        return any(
            hmac.compare_digest(token, self._token(secret, ip, port))
            for secret in (self._current, self._previous)
        )
