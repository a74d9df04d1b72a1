"""Peer addresses: the host and UDP port a node is reached at, and their typed form.

Vocabulary below tickets, discovery and the dialer, which all speak it. Pure.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from p2pfs.errors import LocalProtocolError


@dataclass(frozen=True, slots=True)
class PeerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, allow_names: bool = False) -> PeerAddress:
    """``HOST:PORT`` or ``[V6]:PORT`` as typed by a user (``--peer``, ``--listen``); anything
    else is the user's LocalProtocolError.

    ``allow_names``: HOST may also be a DNS name (``--peer``, ``--bootstrap``: users with a
    dynamic DNS name), resolved when used.
    """
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise LocalProtocolError(f"expected HOST:PORT, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        if not (allow_names and _is_host_name(host)):
            kind = "an IP address or host name" if allow_names else "an IP address"
            raise LocalProtocolError(f"{host!r} is not {kind}") from exc
    return PeerAddress(host, int(port_text))


def _is_host_name(text: str) -> bool:
    """A DNS name as RFC 1123 allows it (letters, digits, hyphens; dot-separated labels)."""
    labels = text.rstrip(".").split(".")
    return len(text) <= 253 and all(
        0 < len(label) <= 63
        and not label.startswith("-")
        and not label.endswith("-")
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        for label in labels
    )


def plain_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a host as sockets write it (a %zone dropped, a v4-mapped IPv6 address read
    as the IPv4 one); None for anything else (a name)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
