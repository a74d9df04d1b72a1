"""The state of this node's gateway port mapping, without I/O: what the gateway said, what
to advertise, when to ask again. ``portmap.py`` feeds it what the gateway answers.

The mapping is asked for over two transports at once (UPnP IGD and PCP/NAT-PMP), as the
same UDP port: whichever gateway protocol answers first makes the node reachable. The
external address is the gateway's external IP (reported by the gateway itself) with the
external port it granted. Time comes in as a parameter.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from p2pfs.address import PeerAddress

RETRY_AFTER = (60.0, 300.0, 900.0, 1800.0)
"""Seconds before asking again once every transport failed (no gateway, or it refused):
a laptop that moves to a network with a gateway gets mapped within minutes, a network
without one costs a few datagrams an hour. Granted leases are renewed by ``portmap.py``
halfway through the lease, as RFC 6886 asks."""
TRANSPORTS = ("upnp", "natpmp")


@dataclass(frozen=True, slots=True)
class Mapped:
    transport: str
    external_port: int


@dataclass(frozen=True, slots=True)
class MapFailed:
    transport: str
    error: str


@dataclass(frozen=True, slots=True)
class ExternalIp:
    host: str


MapEvent = Mapped | MapFailed | ExternalIp


class PortMapState:
    """One UDP port's mapping: per transport "requesting", "mapped" or "failed"."""

    def __init__(self, local_port: int, now: float) -> None:
        self.local_port = local_port
        self._ports: dict[str, int | None] = {}
        """Transport -> external port granted (None: that transport failed)."""
        self._errors: dict[str, str] = {}
        self._external_host: str | None = None
        self._failures = 0
        """Rounds in a row in which every transport failed (picks the retry delay)."""
        self._counted = False
        self._requested_at = now

    def requested(self, now: float) -> None:
        """The mapping was asked for (again): forget what the transports said."""
        self._ports.clear()
        self._errors.clear()
        self._counted = False
        self._requested_at = now

    def handle(self, event: MapEvent) -> None:
        if isinstance(event, Mapped):
            if 0 < event.external_port < 65536:
                self._ports[event.transport] = event.external_port
                self._errors.pop(event.transport, None)
                self._failures = 0
        elif isinstance(event, MapFailed):
            # A later failure of a transport that had mapped (a renewal refused) ends it.
            self._ports[event.transport] = None
            self._errors[event.transport] = event.error
            if self.state == "failed" and not self._counted:
                self._counted = True
                self._failures += 1
        elif _usable(event.host):
            self._external_host = event.host

    @property
    def state(self) -> str:
        if any(port is not None for port in self._ports.values()):
            return "mapped"
        if all(self._ports.get(t, 0) is None for t in TRANSPORTS):
            return "failed"
        return "requesting"

    def external(self) -> PeerAddress | None:
        """The address the internet reaches us at through the gateway, once known."""
        if self._external_host is None:
            return None
        for transport in TRANSPORTS:
            port = self._ports.get(transport)
            if port is not None:
                return PeerAddress(self._external_host, port)
        return None

    def retry_at(self) -> float | None:
        """When to ask again (every transport failed), else None."""
        if self.state != "failed":
            return None
        delay = RETRY_AFTER[min(self._failures, len(RETRY_AFTER)) - 1]
        return self._requested_at + delay

    def errors(self) -> dict[str, str]:
        return dict(self._errors)

    def info(self) -> dict[str, object]:
        """What ``id --json`` shows under ``port_mapping``."""
        external = self.external()
        return {
            "protocol": "udp",
            "local_port": self.local_port,
            "external": str(external) if external is not None else None,
            "state": self.state,
            "via": [t for t in TRANSPORTS if self._ports.get(t) is not None],
            "errors": self.errors(),
        }


def _usable(host: str) -> bool:
    """A gateway that does not know its external IP reports 0.0.0.0; that is no address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (address.is_unspecified or address.is_loopback or address.is_multicast)
