"""Gateway port mapping of the node's UDP port: PCP (falling back to NAT-PMP) and UPnP IGD,
both asked at once, in trio; what the gateway says goes to ``PortMapState``.

The messages are ``gatewaywire.py``'s. Each protocol runs as one task that maps, renews
halfway through the granted lease, and reports a failure; once every protocol has failed,
the state says when to ask again. On exit the mappings are deleted (bounded by
``STOP_TIMEOUT``). The gateway is the default route's next hop (Linux: ``/proc/net/route``)
for PCP/NAT-PMP, and whatever device answers the SSDP search for UPnP.

Given an IPv6 address of ours on the default route, one more task asks the router for a
pinhole through its firewall to that address and our port: over PCP to the route's next
hop (``/proc/net/ipv6_route``; RFC 6887's IPv6 firewall case), else over UPnP IGD v2
(WANIPv6FirewallControl, found by an SSDP search over IPv6). A home router's stateful
firewall drops what nobody inside asked for, so without one a peer outside reaches us over
IPv6 only by a punch. It never touches the IPv4 mapping's state; refused or unanswered, it
asks again every ``PINHOLE_RETRY``.

Port mapping never stops the daemon: any failure here is logged once and the node goes on
without it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import random
import socket as stdlib_socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import trio

from p2pfs.address import PeerAddress
from p2pfs.errors import LocalProtocolError, P2pfsError, RemoteProtocolError
from p2pfs.net.boundary import describe, split_fatal

from . import gatewaywire as wire
from .portmapstate import ExternalIp, MapEvent, MapFailed, Mapped, PortMapState

logger = logging.getLogger(__name__)
Parsed = TypeVar("Parsed")

STOP_TIMEOUT = 3.0
"""Seconds shutdown gives the gateway to confirm the deletion (within the daemon's grace)."""
LEASE = 3600
"""Seconds a lease asks for: a mapping of a daemon that died unasked lapses within this."""
MIN_RENEW = 30.0
"""Renew no more often than this, whatever short lease a gateway grants."""
UDP_TRIES = (0.25, 0.5, 1.0, 2.0)
"""PCP/NAT-PMP: wait this long for an answer before each resend (RFC 6886's doubling,
cut short: a LAN gateway answers in milliseconds or not at all)."""
SSDP_WAIT = 3.0
HTTP_TIMEOUT = 5.0
CONFLICT_TRIES = 3
"""UPnP: external ports tried at random when another host holds ours (error 718)."""
UPNP_CONFLICT = 718
ROUTE_TABLE = "/proc/net/route"
ROUTE_TABLE6 = "/proc/net/ipv6_route"
PINHOLE_RETRY = 600.0
"""Seconds between attempts at an IPv6 pinhole when none is open (no PCP server, no
address, refused): a router that gains PCP, or an address that appears, is found again."""
PINHOLE_REASK = 1.0
"""Seconds before a pinhole is asked for a new address, after the old one's deletion."""
PINHOLE_RECHECK = 60.0
"""Seconds between looks at our IPv6 address (only the kernel is asked): a machine whose
address comes after the daemon starts (SLAAC at boot) gets its pinhole within a minute, and
a pinhole follows an address that changes within a minute."""
DESCRIPTION = "p2pfs"

Failure = (P2pfsError, OSError, trio.TooSlowError)
"""What a gateway conversation can end in; anything else is a bug and ends the mapper."""


def default_gateway(route_table: str = ROUTE_TABLE) -> str | None:
    """The IPv4 default route's next hop, or None (no default route, not Linux)."""
    try:
        with open(route_table, encoding="ascii") as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # Destination 0.0.0.0, flags RTF_UP | RTF_GATEWAY.
        if len(fields) >= 4 and fields[1] == "00000000" and int(fields[3], 16) & 0x3 == 0x3:
            return stdlib_socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


def default_gateway6(route_table: str = ROUTE_TABLE6) -> tuple[str, str] | None:
    """The IPv6 default route's next hop and its interface (a link-local next hop, as
    router advertisements give, is reached through that interface), or None. Of several
    default routes (two routers, or a second interface), the lowest metric's, as the
    kernel prefers it."""
    try:
        with open(route_table, encoding="ascii") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    best: tuple[int, str, str] | None = None
    for line in lines:
        fields = line.split()
        # Destination ::/0, a next hop, flags RTF_UP | RTF_GATEWAY.
        if len(fields) < 10 or fields[0] != "0" * 32 or fields[1] != "00":
            continue
        try:
            metric, flags = int(fields[5], 16), int(fields[8], 16)
            hop = ipaddress.IPv6Address(bytes.fromhex(fields[4]))
        except ValueError:
            continue
        if flags & 0x3 != 0x3 or hop.is_unspecified:
            continue
        if best is None or metric < best[0]:
            best = (metric, str(hop), fields[9])
    return None if best is None else (best[1], best[2])


def _source_address(host: str, port: int) -> str:
    """Our address on the way to ``host`` (a connected UDP socket sends nothing)."""
    with stdlib_socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return str(probe.getsockname()[0])


@dataclass(slots=True)
class _Lease:
    """A granted mapping: how to renew it, how to delete it, and what to let go of when
    it ends without a deletion (its renewal failed)."""

    renew: Callable[[], Awaitable[wire.MapReply]]
    delete: Callable[[], Awaitable[None]]
    reply: wire.MapReply
    close: Callable[[], None] = lambda: None


class PortMapper:
    """Maps ``local_port`` (UDP) at the gateway while ``serve`` runs; ``changed`` is called
    (in trio) whenever the external address appears, changes or goes."""

    def __init__(
        self,
        local_port: int,
        changed: Callable[[PeerAddress | None], None],
        *,
        route_table: str = ROUTE_TABLE,
        ipv6_host: Callable[[], str | None] | None = None,
        route_table6: str = ROUTE_TABLE6,
    ) -> None:
        """``ipv6_host``: the IPv6 address of ours to open a pinhole to, read when one is
        asked for and every PINHOLE_RECHECK while one is held (it answers None: no pinhole
        now); None: the node has no IPv6 socket, nothing is asked."""
        self.state = PortMapState(local_port, trio.current_time())
        self.pinhole: PeerAddress | None = None
        """Where the IPv6 firewall lets peers in, while the gateway grants it."""
        self._changed = changed
        self._route_table = route_table
        self._ipv6_host = ipv6_host or (lambda: None)
        self._pinholes = ipv6_host is not None
        self._route_table6 = route_table6
        self._pinhole_error: str | None = None
        self._pinhole_via: str | None = None
        """"pcp" or "upnp": which granted the pinhole held."""
        self._pinhole_failure_logged = False
        self._round = 0
        self._round_changed = trio.Event()
        self._leases: dict[str, _Lease] = {}
        self._last: PeerAddress | None = None
        self._logged_failure = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A failure boundary (GUIDE rule 12): whatever goes wrong but cancellation, one log
        line and the node carries on unmapped."""
        task_status.started()
        try:
            await self._serve()
        except BaseException as exc:
            fatal, failure = split_fatal(exc)
            if failure is not None:
                logger.warning("port mapping stopped: %s", describe(failure))
                self._set_external(None)
            if fatal is exc:
                raise
            if fatal is not None:
                raise fatal from None

    async def _serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep, "natpmp", self._map_pcp)
                nursery.start_soon(self._keep, "upnp", self._map_upnp)
                if self._pinholes:
                    nursery.start_soon(self._keep_pinhole)
                while True:
                    retry = self.state.retry_at()
                    changed = self._round_changed
                    with trio.move_on_at(math.inf if retry is None else retry) as timer:
                        await changed.wait()
                    if timer.cancelled_caught:
                        logger.debug("port mapping: asking the gateway again")
                        self.state.requested(trio.current_time())
                        self._next_round()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT) as waited:
                async with trio.open_nursery() as deleting:
                    for lease in self._leases.values():
                        deleting.start_soon(_delete_quietly, lease)
            if waited.cancelled_caught:
                logger.info("port mapping: the gateway did not confirm the deletion in time")

    def _next_round(self) -> None:
        self._round += 1
        self._round_changed.set()
        self._round_changed = trio.Event()

    async def _keep(self, transport: str, open_lease: Callable[[], Awaitable[_Lease]]) -> None:
        """One protocol: map, renew until refused, report; wait for the next round."""
        while True:
            started_round = self._round
            lease: _Lease | None = None
            try:
                lease = await open_lease()
                self._leases[transport] = lease
                while True:
                    self._granted(transport, lease.reply)
                    delay = (
                        max(lease.reply.lifetime / 2, MIN_RENEW)
                        if lease.reply.lifetime
                        else LEASE / 2
                    )
                    await trio.sleep(delay)
                    lease.reply = await lease.renew()
            except Failure as exc:
                self._leases.pop(transport, None)
                if lease is not None:
                    lease.close()
                self._handle(MapFailed(transport, str(exc) or type(exc).__name__))
            while self._round == started_round:
                await self._round_changed.wait()

    async def _keep_pinhole(self) -> None:
        """The IPv6 pinhole: held while our address stays the same, asked for again a
        moment after it changes, and every PINHOLE_RETRY while the router refuses."""
        while True:
            host = self._ipv6_host()
            gateway = default_gateway6(self._route_table6)
            if host is None or gateway is None:
                # Nothing to ask for, which is no failure of a gateway: not logged.
                self.pinhole = None
                self._pinhole_error = (
                    "no global IPv6 address on the default route"
                    if host is None
                    else "no IPv6 default route"
                )
                await trio.sleep(PINHOLE_RECHECK)
                continue
            try:
                await self._hold_pinhole(host, gateway)
            except Failure as exc:
                self._pinhole_failed(str(exc) or type(exc).__name__)
                await trio.sleep(PINHOLE_RETRY)
            else:
                # An address that comes and goes cannot make a burst of requests.
                await trio.sleep(PINHOLE_REASK)

    async def _hold_pinhole(self, host: str, gateway: tuple[str, str]) -> None:
        """Open a pinhole to ``host`` and renew it halfway through each lease; return once
        our address is another (the pinhole deleted). Our address is looked at every
        PINHOLE_RECHECK, so a pinhole follows a new address within a minute, not at the
        next renewal. Cancelled (the daemon stops), the lease stays in ``_leases`` for
        ``_serve`` to delete."""
        lease = await self._open_pinhole(host, gateway)
        port = self.state.local_port
        self._leases["pinhole"] = lease
        try:
            while True:
                try:
                    granted = _pinhole_granted(host, port, lease.reply)
                except RemoteProtocolError:
                    await _delete_quietly(lease)  # nothing of use: not left to lapse
                    raise
                self._opened(granted)
                renew_at = trio.current_time() + max(lease.reply.lifetime / 2, MIN_RENEW)
                while (now := trio.current_time()) < renew_at:
                    if self._ipv6_host() != host:
                        with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
                            await _delete_quietly(lease)
                        self._leases.pop("pinhole", None)
                        self.pinhole = None
                        return
                    await trio.sleep(min(PINHOLE_RECHECK, renew_at - now))
                lease.reply = await lease.renew()
        except Failure:
            self._leases.pop("pinhole", None)
            lease.close()
            raise

    async def _open_pinhole(self, host: str, gateway: tuple[str, str]) -> _Lease:
        """A pinhole from the IPv6 router over PCP, else from an IGD v2 on the link over
        UPnP (routers offer either); both refusals named if neither grants one."""
        hop, interface = gateway
        port = self.state.local_port
        try:
            lease = await open_pcp_lease(hop, wire.GATEWAY_PORT, port, source=host, via=interface)
            self._pinhole_via = "pcp"
            return lease
        except Failure as exc:
            pcp_error = str(exc) or type(exc).__name__
        try:
            lease = await open_upnp_pinhole(host, port, interface)
        except Failure as exc:
            upnp_error = str(exc) or type(exc).__name__
            raise RemoteProtocolError(f"pcp: {pcp_error}; upnp: {upnp_error}") from exc
        self._pinhole_via = "upnp"
        return lease

    def _opened(self, pinhole: PeerAddress) -> None:
        if pinhole != self.pinhole:
            logger.info(
                "port mapping: the IPv6 firewall lets peers in at %s (%s)",
                pinhole,
                self._pinhole_via,
            )
        self.pinhole, self._pinhole_error = pinhole, None
        self._pinhole_failure_logged = False

    def _pinhole_failed(self, why: str) -> None:
        """Logged once until a pinhole is granted again (retries say the same)."""
        if not self._pinhole_failure_logged:
            logger.info("port mapping: no IPv6 pinhole (%s)", why)
            self._pinhole_failure_logged = True
        self.pinhole, self._pinhole_error = None, why

    def info(self) -> dict[str, object]:
        """What ``id --json`` shows under ``port_mapping``."""
        return {
            **self.state.info(),
            "ipv6_pinhole": str(self.pinhole) if self.pinhole is not None else None,
            "ipv6_pinhole_via": self._pinhole_via if self.pinhole is not None else None,
            "ipv6_pinhole_error": self._pinhole_error,
        }

    def _granted(self, transport: str, reply: wire.MapReply) -> None:
        if reply.external_host is not None:
            self._handle(ExternalIp(reply.external_host), after=False)
        self._handle(Mapped(transport, reply.external_port))

    def _handle(self, event: MapEvent, *, after: bool = True) -> None:
        self.state.handle(event)
        if not after:
            return
        self._set_external(self.state.external())
        if self.state.state == "failed":
            if not self._logged_failure:
                self._logged_failure = True
                errors = ", ".join(f"{k}: {v}" for k, v in self.state.errors().items())
                logger.info(
                    "port mapping: no gateway mapped UDP %d (%s)", self.state.local_port, errors
                )
            self._round_changed.set()  # the retry time is due now
            self._round_changed = trio.Event()

    def _set_external(self, external: PeerAddress | None) -> None:
        if external != self._last:
            self._last = external
            if external is not None and not ipaddress.ip_address(external.host).is_global:
                logger.info(
                    "port mapping: the gateway mapped us at %s, not a public address: "
                    "another NAT stands beyond it (the ISP's carrier-grade NAT?)",
                    external,
                )
            elif external is not None:
                logger.info("port mapping: reachable at %s through the gateway", external)
            self._changed(external)

    async def _map_pcp(self) -> _Lease:
        gateway = default_gateway(self._route_table)
        if gateway is None:
            raise LocalProtocolError("no default route")
        return await open_pcp_lease(gateway, wire.GATEWAY_PORT, self.state.local_port)

    # -- UPnP IGD -------------------------------------------------------------------------

    async def _map_upnp(self) -> _Lease:
        location = await _ssdp_search()
        description = await _http("GET", location)
        if description.status != 200:
            raise RemoteProtocolError(f"the gateway's description: HTTP {description.status}")
        service = wire.find_wan_service(description.body, location)
        host = urlsplit(service.control_url).hostname
        if host is None or host != urlsplit(location).hostname:
            # Only the device that answered the search is spoken to.
            raise RemoteProtocolError("a control URL on another host than the gateway")
        client = _source_address(host, 80)
        port = self.state.local_port

        async def call(action: str, arguments: dict[str, str | int]) -> dict[str, str]:
            body = wire.soap_body(service.service_type, action, arguments)
            response = await _http(
                "POST", service.control_url, body, f"{service.service_type}#{action}"
            )
            return wire.parse_soap(response)

        async def add(external: int) -> wire.MapReply:
            lease = LEASE
            for _ in range(2):
                try:
                    await call(
                        "AddPortMapping",
                        {
                            "NewRemoteHost": "",
                            "NewExternalPort": external,
                            "NewProtocol": "UDP",
                            "NewInternalPort": port,
                            "NewInternalClient": client,
                            "NewEnabled": 1,
                            "NewPortMappingDescription": DESCRIPTION,
                            "NewLeaseDuration": lease,
                        },
                    )
                    break
                except wire.GatewayRefusedError as exc:
                    if exc.code != wire.UPNP_ONLY_PERMANENT_LEASES or lease == 0:
                        raise
                    lease = 0  # deleted at exit; a crash leaves it until the router restarts
            external_ip = await call("GetExternalIPAddress", {})
            return wire.MapReply(external, lease, external_ip.get("NewExternalIPAddress"))

        candidates = [port] + [random.randint(1024, 65535) for _ in range(CONFLICT_TRIES)]
        for number, external in enumerate(candidates):
            try:
                reply = await add(external)
                break
            except wire.GatewayRefusedError as exc:
                if exc.code != UPNP_CONFLICT or number == len(candidates) - 1:
                    raise
        granted = reply.external_port

        async def renew() -> wire.MapReply:
            return await add(granted)

        async def delete() -> None:
            await call(
                "DeletePortMapping",
                {"NewRemoteHost": "", "NewExternalPort": granted, "NewProtocol": "UDP"},
            )

        return _Lease(renew, delete, reply)


def _pinhole_granted(host: str, port: int, reply: wire.MapReply) -> PeerAddress:
    """Where the router's answer lets peers in: our own address and port, or the answer is
    no pinhole for the address we advertise (a router that translates, NPTv6 or NAT66,
    names another; a lifetime of 0 is a deletion, RFC 6887 15)."""
    if reply.lifetime == 0:
        raise RemoteProtocolError("the router answered with a lifetime of 0 (no pinhole)")
    external = ipaddress.ip_address(reply.external_host or "::")
    if not external.is_unspecified and external != ipaddress.ip_address(host):
        raise RemoteProtocolError(f"the router would translate {host} to {external}")
    if reply.external_port != port:
        raise RemoteProtocolError(
            f"the router would translate port {port} to {reply.external_port}"
        )
    return PeerAddress(host, port)


async def _delete_quietly(lease: _Lease) -> None:
    try:
        await lease.delete()
    except Failure as exc:
        logger.debug("port mapping: deleting a mapping failed: %s", describe(exc))


async def _ask(
    sock: trio.socket.SocketType, request: bytes, parse: Callable[[bytes], Parsed]
) -> Parsed:
    """Send ``request`` until an answer parses (resending on silence); a malformed
    datagram is ignored (anyone on the LAN may send one), a refusal is raised."""
    for wait in UDP_TRIES:
        await sock.send(request)
        with trio.move_on_after(wait):
            while True:
                data = await sock.recv(1100)
                try:
                    return parse(data)
                except wire.GatewayRefusedError:
                    raise
                except RemoteProtocolError:
                    continue
    raise trio.TooSlowError("no answer from the gateway")


async def _ssdp_search(
    targets: tuple[str, ...] = wire.IGD_SEARCH_TARGETS,
    *,
    source: str | None = None,
    via: str | None = None,
) -> str:
    """The description URL of the first IGD that answers an SSDP search on the LAN: over
    IPv4, or, given our IPv6 ``source`` address, over IPv6 on interface ``via``."""
    ipv6 = source is not None
    sock = trio.socket.socket(
        trio.socket.AF_INET6 if ipv6 else trio.socket.AF_INET, trio.socket.SOCK_DGRAM
    )
    with sock:
        if ipv6:
            assert source is not None
            scope = stdlib_socket.if_nametoindex(via) if via is not None else 0
            sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_MULTICAST_IF, scope)
            await sock.bind((source, 0))
            group: tuple[str, int] | tuple[str, int, int, int] = (*wire.SSDP_GROUP6, 0, scope)
        else:
            sock.setsockopt(trio.socket.IPPROTO_IP, trio.socket.IP_MULTICAST_TTL, 2)
            await sock.bind(("0.0.0.0", 0))
            group = wire.SSDP_GROUP
        for target in targets:
            search = wire.ssdp_search(target, wire.SSDP_GROUP6 if ipv6 else wire.SSDP_GROUP)
            await sock.sendto(search, group)
        with trio.move_on_after(SSDP_WAIT):
            while True:
                data, sender = await sock.recvfrom(2048)
                try:
                    location = wire.parse_ssdp_location(data)
                except RemoteProtocolError:
                    continue
                # A device may only name itself: no answer on the LAN points us elsewhere.
                if _same_host(urlsplit(location).hostname, sender[0]):
                    return location
    raise RemoteProtocolError("no UPnP gateway answered the search")


def _same_host(named: str | None, sender: str) -> bool:
    """Whether a URL's host is the address an answer came from (IPv6 in any spelling; a
    link-local one's zone, which a URL may carry as ``%25eth0``, left out)."""
    if named is None:
        return False
    try:
        return _unzoned(named) == _unzoned(sender)
    except ValueError:
        return False


def _unzoned(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host.partition("%")[0])


async def _http(
    method: str,
    url: str,
    body: bytes = b"",
    soap_action: str | None = None,
    *,
    source: str | None = None,
    via: str | None = None,
) -> wire.HttpResponse:
    """One HTTP exchange with the gateway; ``source``: our address to connect from (an
    IGD checks a pinhole's internal client against it); ``via``: the interface a
    link-local host is on (an IGD answering an IPv6 search may name its link-local
    address, as the UPnP Device Architecture asks of it: AVM's routers do)."""
    parts = urlsplit(url)
    assert parts.hostname is not None  # the wire module accepts http URLs with a host only
    host = parts.hostname.partition("%")[0]
    try:
        link_local = ipaddress.ip_address(host).is_link_local
    except ValueError:
        link_local = False
    if link_local and via is not None:
        host = f"{host}%{via}"
    with trio.fail_after(HTTP_TIMEOUT):
        stream = await trio.open_tcp_stream(host, parts.port or 80, local_address=source)
        async with stream:
            await stream.send_all(wire.http_request(method, url, body, soap_action))
            received = bytearray()
            while len(received) <= wire.HTTP_LIMIT:
                data = await stream.receive_some(16384)
                if not data:
                    break
                received += data
            else:
                raise RemoteProtocolError("the gateway's HTTP answer is too long")
    return wire.parse_http_response(bytes(received))


async def open_upnp_pinhole(host: str, port: int, via: str) -> _Lease:
    """An IPv6 pinhole to ``[host]:port`` (UDP) from an IGD v2's WANIPv6FirewallControl,
    found by an SSDP search over IPv6 on interface ``via``: every request goes out from
    ``host``, which the device checks against the pinhole's internal client."""
    location = await _ssdp_search(wire.PINHOLE_SEARCH_TARGETS, source=host, via=via)
    description = await _http("GET", location, source=host, via=via)
    if description.status != 200:
        raise RemoteProtocolError(f"the gateway's description: HTTP {description.status}")
    service = wire.find_service(
        description.body, location, wire.PINHOLE_SERVICES, "IPv6 firewall control service"
    )
    if not _same_host(urlsplit(service.control_url).hostname, urlsplit(location).hostname or ""):
        raise RemoteProtocolError("a control URL on another host than the gateway")

    async def call(action: str, arguments: dict[str, str | int]) -> dict[str, str]:
        body = wire.soap_body(service.service_type, action, arguments)
        response = await _http(
            "POST",
            service.control_url,
            body,
            f"{service.service_type}#{action}",
            source=host,
            via=via,
        )
        return wire.parse_soap(response)

    answer = await call(
        "AddPinhole",
        {
            "RemoteHost": "",  # any peer
            "RemotePort": 0,
            "InternalClient": host,
            "InternalPort": port,
            "Protocol": wire.UDP,
            "LeaseTime": LEASE,
        },
    )
    unique = answer.get("UniqueID", "")
    if not (unique.isascii() and unique.isdigit() and int(unique) < 1 << 16):  # a ui2
        raise RemoteProtocolError(f"AddPinhole answered no pinhole id: {unique[:20]!r}")
    reply = wire.MapReply(port, LEASE, host)

    async def renew() -> wire.MapReply:
        await call("UpdatePinhole", {"UniqueID": unique, "NewLeaseTime": LEASE})
        return reply

    async def delete() -> None:
        await call("DeletePinhole", {"UniqueID": unique})

    return _Lease(renew, delete, reply)


async def open_pcp_lease(
    gateway: str,
    gateway_port: int,
    port: int,
    *,
    source: str | None = None,
    via: str | None = None,
) -> _Lease:
    """Map UDP ``port`` over PCP, or NAT-PMP where the gateway answers PCP with "unsupported
    version"; the lease renews and deletes over the protocol that granted it.

    An IPv6 ``gateway`` is asked for a pinhole to ``source`` (our address: the request goes
    out from it, as a PCP server checks), reached through interface ``via`` when it is
    link-local; NAT-PMP has no IPv6, so there a refusal stands."""
    ipv6 = ":" in gateway
    family = trio.socket.AF_INET6 if ipv6 else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    nonce = os.urandom(12)
    client = ""

    async def pcp(lifetime: int, suggested: int) -> wire.MapReply:
        request = wire.pcp_map_request(client, port, suggested, lifetime, nonce)
        return await _ask(sock, request, lambda data: wire.parse_pcp_map(data, nonce, port))

    async def natpmp(lifetime: int, suggested: int) -> wire.MapReply:
        host = await _ask(sock, wire.natpmp_address_request(), wire.parse_natpmp_address)
        request = wire.natpmp_map_request(port, suggested, lifetime)
        reply = await _ask(sock, request, lambda data: wire.parse_natpmp_map(data, port))
        return wire.MapReply(reply.external_port, reply.lifetime, host)

    try:
        if ipv6:
            if source is not None:
                await sock.bind((source, 0))
            scope = stdlib_socket.if_nametoindex(via) if via is not None else 0
            await sock.connect((gateway, gateway_port, 0, scope))
        else:
            await sock.connect((gateway, gateway_port))
        client = str(sock.getsockname()[0]).partition("%")[0]  # checked against the source
        ask = pcp
        try:
            reply = await pcp(LEASE, port)
        except wire.GatewayRefusedError as exc:
            if exc.code != wire.PCP_UNSUPPORTED_VERSION or ipv6:
                raise
            ask = natpmp
            reply = await natpmp(LEASE, port)
    except BaseException:
        sock.close()
        raise

    async def renew() -> wire.MapReply:
        return await ask(LEASE, reply.external_port)

    async def delete() -> None:
        try:
            await ask(0, 0)
        finally:
            sock.close()

    return _Lease(renew, delete, reply, sock.close)
