"""LAN discovery: nodes on one link find each other with no configuration.

Like Syncthing's local discovery, every node sends a periodic ANNOUNCE beacon (codec and
table in :mod:`p2pfs.discovery.beacon`) to the link: IPv4 multicast (239.255.112.50) and
limited broadcast (255.255.255.255), and IPv6 link-local multicast (ff12::7032:6673), on one
UDP port (21029 by default; Syncthing's is 21027). Unlike Syncthing, a node can also ask:
``find`` multicasts a QUERY for a key and holders answer at once by unicast, so a lookup
takes one round trip on the link instead of up to a beacon interval.

Each node has two sockets per address family: a *listen* socket bound to the shared port
(``SO_REUSEPORT``, so several nodes on one host all hear the group) that receives beacons and
queries, and a *send* socket on an ephemeral port from which we send everything; answers come
back to that socket's unique port (unicast to a shared port would reach only one of the
nodes of a host). Multicast is sent and joined per interface, so multi-homed hosts beacon on
every link. Our own beacons (looped back by the kernel) are recognised by our NodeId.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import random
import socket
import struct
from collections.abc import Sequence
from typing import Any

import trio

from p2pfs.address import PeerAddress
from p2pfs.discovery.beacon import (
    MAX_DATAGRAM,
    Beacon,
    BeaconError,
    LanTable,
    MessageType,
    TokenBucket,
    announce_windows,
    key_prefix,
    parse_beacon_untrusted,
)
from p2pfs.discovery.seam import Provider
from p2pfs.errors import LocalProtocolError
from p2pfs.ids import NodeId

log = logging.getLogger(__name__)

SOURCE = "lan"
LAN_PORT = 21029
GROUP_V4 = "239.255.112.50"
"""Organisation-local scope (RFC 2365): routers at a site boundary do not forward it."""
GROUP_V6 = "ff12::7032:6673"
"""Link-local scope, transient ("p2fs" in the last 32 bits)."""
BEACON_INTERVAL = 30.0
"""As Syncthing: a beacon every 30 s, forgotten after three missed ones."""
TTL_INTERVALS = 3
QUERY_TIMEOUT = 1.0
"""A LAN round trip is milliseconds; one second covers a slow Wi-Fi wake-up."""
QUERY_SETTLE = 0.15
"""After the first answer, wait this long for the other holders' answers."""
MIN_BEACON_GAP = 1.0
"""Announcing many keys at once sends one beacon, not one per key."""
ANSWER_RATE = 50.0
ANSWER_BURST = 100.0


def _interfaces() -> list[int]:
    try:
        return [index for index, _name in socket.if_nameindex()]
    except OSError:
        return []


def _mreqn_v4(group: str, ifindex: int) -> bytes:
    # struct ip_mreqn (Linux): group, local address (any), interface index.
    return struct.pack("4s4si", socket.inet_aton(group), socket.inet_aton("0.0.0.0"), ifindex)


class LanFinder:
    """A :class:`~p2pfs.discovery.seam.Finder` for the local link.

    ``node_id`` is ours (32 bytes, carried in beacons so peers can pin our key);
    ``quic_port`` is where peers reach us. ``targets`` replaces the multicast and broadcast
    destinations with fixed unicast ``(host, port)`` ones (tests on 127.0.0.1, or a static
    list of neighbours); ``port`` 0 then picks a free port (see :attr:`port`).
    """

    name = SOURCE
    ends_by_silence = True

    def __init__(
        self,
        node_id: bytes,
        quic_port: int,
        *,
        port: int = LAN_PORT,
        interval: float = BEACON_INTERVAL,
        query_timeout: float = QUERY_TIMEOUT,
        query_settle: float = QUERY_SETTLE,
        ipv6: bool = True,
        targets: Sequence[tuple[str, int]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if len(node_id) != 32 or not 0 < quic_port < 65536 or not 0 <= port < 65536:
            raise LocalProtocolError("LanFinder: 32-byte node id, ports in range")
        self._node_id = node_id
        self._quic_port = quic_port
        self._port = port
        self._interval = interval
        self._query_timeout = query_timeout
        self._query_settle = query_settle
        self._ipv6 = ipv6
        self._targets = list(targets) if targets is not None else None
        self._rng = rng or random.Random()
        self._instance = self._rng.getrandbits(64)
        self._table = LanTable(ttl=interval * TTL_INTERVALS)
        self._answers = TokenBucket(ANSWER_RATE, ANSWER_BURST)
        self._keys: dict[bytes, None] = {}
        self._prefixes: dict[bytes, int] = {}
        self._beacon_now = trio.Event()
        self._lookups: dict[bytes, set[trio.Event]] = {}
        self._send: dict[socket.AddressFamily, trio.socket.SocketType] = {}
        self._joined: dict[socket.AddressFamily, set[int]] = {}
        self._listen_sockets: dict[socket.AddressFamily, trio.socket.SocketType] = {}
        self._serving = False
        self._served = False

    @property
    def port(self) -> int:
        """The bound LAN discovery port (after ``serve`` started)."""
        return self._port

    # --- lifetime --------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._served:
            raise LocalProtocolError("a LanFinder serves once")
        self._served = True
        with contextlib.ExitStack() as stack:
            listen = await self._open_family(socket.AF_INET, stack)
            listeners = [listen]
            if self._ipv6 and self._targets is None and socket.has_ipv6:
                try:
                    listeners.append(await self._open_family(socket.AF_INET6, stack))
                except OSError as exc:
                    # A host without IPv6 still discovers over IPv4.
                    log.info("lan: no IPv6 discovery: %s", exc)
            self._serving = True
            try:
                async with trio.open_nursery() as nursery:
                    for sock in listeners + list(self._send.values()):
                        nursery.start_soon(self._receive_loop, sock)
                    nursery.start_soon(self._beacon_loop)
                    log.info("lan: discovery on UDP port %d", self._port)
                    task_status.started()
            finally:
                self._serving = False
                self._send.clear()

    async def _open_family(
        self, family: socket.AddressFamily, stack: contextlib.ExitStack
    ) -> trio.socket.SocketType:
        any_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        listen = stack.enter_context(trio.socket.socket(family, socket.SOCK_DGRAM))
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            listen.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await listen.bind((any_host, self._port))
        self._port = listen.getsockname()[1]

        send = stack.enter_context(trio.socket.socket(family, socket.SOCK_DGRAM))
        if family == socket.AF_INET6:
            send.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            send.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            send.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
        else:
            send.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            # Loop on: other nodes on this host hear us through the same group.
            send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        await send.bind((any_host, 0))
        self._send[family] = send
        self._joined[family] = set()
        self._listen_sockets[family] = listen
        self._join_groups()
        return listen

    def _join_groups(self) -> None:
        """Join our group on every interface (again as interfaces appear)."""
        if self._targets is not None:
            return
        interfaces = _interfaces()
        for family, listen in self._listen_sockets.items():
            joined = self._joined[family]
            for index in interfaces:
                if index in joined:
                    continue
                try:
                    if family == socket.AF_INET6:
                        group = socket.inet_pton(socket.AF_INET6, GROUP_V6)
                        mreq = struct.pack("16sI", group, index)
                        listen.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
                    else:
                        mreqn = _mreqn_v4(GROUP_V4, index)
                        listen.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                except OSError as exc:
                    # Interfaces without multicast (some tunnels) or already gone.
                    log.debug("lan: cannot join group on interface %d: %s", index, exc)
                joined.add(index)
            joined.intersection_update(interfaces)

    # --- sending ---------------------------------------------------------------------------

    async def _broadcast(self, beacon: Beacon) -> None:
        """Send ``beacon`` to every destination on the link; errors on one do not stop us."""
        data = beacon.to_wire()
        if self._targets is not None:
            for host, port in self._targets:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                await self._send_to(family, data, (host, port))
            return
        for index in _interfaces():
            if socket.AF_INET in self._send:
                with contextlib.suppress(OSError):
                    self._send[socket.AF_INET].setsockopt(
                        socket.IPPROTO_IP, socket.IP_MULTICAST_IF, _mreqn_v4("0.0.0.0", index)
                    )
                    await self._send_to(socket.AF_INET, data, (GROUP_V4, self._port))
            if socket.AF_INET6 in self._send:
                await self._send_to(socket.AF_INET6, data, (GROUP_V6, self._port, 0, index))
        # Limited broadcast reaches links where multicast is filtered (as Syncthing's IPv4).
        await self._send_to(socket.AF_INET, data, ("255.255.255.255", self._port))

    async def _send_to(self, family: socket.AddressFamily, data: bytes, address: Any) -> None:
        sock = self._send.get(family)
        if sock is None:
            return
        try:
            await sock.sendto(data, address)
        except OSError as exc:
            # A down interface or no route for one destination: the others still go out.
            log.debug("lan: send to %s failed: %s", address[0], exc)

    async def _beacon_loop(self) -> None:
        offset = 0
        sent_keys = False
        while True:
            # A fresh wake-up before the keys are read: an announce or withdraw that lands
            # while this beacon is being sent sets it, and the next beacon follows at once
            # (made after the send, it was lost until the next interval).
            self._beacon_now = trio.Event()
            self._join_groups()
            prefixes, complete, offset = announce_windows(self._keys, offset)
            # A node with nothing to offer stays quiet, except once to say it has nothing.
            if prefixes or sent_keys:
                await self._broadcast(
                    Beacon(
                        MessageType.ANNOUNCE,
                        self._node_id,
                        self._instance,
                        self._quic_port,
                        prefixes,
                        complete,
                    )
                )
            sent_keys = bool(prefixes)
            last = trio.current_time()
            jitter = self._rng.uniform(0.9, 1.1)
            with trio.move_on_after(self._interval * jitter):
                await self._beacon_now.wait()
            await trio.sleep_until(last + min(MIN_BEACON_GAP, self._interval))

    # --- receiving -------------------------------------------------------------------------

    async def _receive_loop(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data, address = await sock.recvfrom(MAX_DATAGRAM + 1)
            except OSError as exc:
                # ICMP errors from an earlier send surface here on Linux; not fatal.
                log.debug("lan: receive error: %s", exc)
                continue
            await self._on_datagram(data, address)

    async def _on_datagram(self, data: bytes, address: Any) -> None:
        try:
            beacon = parse_beacon_untrusted(data)
        except BeaconError as exc:
            log.debug("lan: dropped datagram from %s: %s", address[0], exc)
            return
        if beacon.node_id == self._node_id:
            return  # our own, looped back
        host = _host_of(address)
        now = trio.current_time()
        if beacon.type is MessageType.QUERY:
            held = tuple(p for p in beacon.prefixes if p in self._prefixes)
            if held and self._answers.take(now):
                answer = Beacon(
                    MessageType.ANSWER, self._node_id, self._instance, self._quic_port, held
                )
                family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
                await self._send_to(family, answer.to_wire(), address)
            return
        self._table.record(beacon, host, now)
        for prefix in beacon.prefixes:
            for event in self._lookups.get(prefix, ()):
                event.set()

    # --- the seam --------------------------------------------------------------------------

    def _require_serving(self) -> None:
        if not self._serving:
            raise LocalProtocolError("LanFinder is not serving")

    async def announce(self, key: bytes) -> None:
        self._require_serving()
        if key not in self._keys:
            self._keys[key] = None
            prefix = key_prefix(key)
            self._prefixes[prefix] = self._prefixes.get(prefix, 0) + 1
            self._beacon_now.set()
        await trio.lowlevel.checkpoint()

    def addresses_changed(self) -> None:
        """A beacon now: peers take a beacon's address from its datagram's source."""
        self._beacon_now.set()

    async def withdraw(self, key: bytes) -> None:
        if key in self._keys:
            del self._keys[key]
            prefix = key_prefix(key)
            self._prefixes[prefix] -= 1
            if not self._prefixes[prefix]:
                del self._prefixes[prefix]
            # The next complete beacon drops the key from every table at once.
            self._beacon_now.set()
        await trio.lowlevel.checkpoint()

    async def find(self, key: bytes, limit: int = 16) -> Sequence[Provider]:
        self._require_serving()
        prefix = key_prefix(key)
        arrived = trio.Event()
        self._lookups.setdefault(prefix, set()).add(arrived)
        try:
            query = Beacon(MessageType.QUERY, self._node_id, self._instance, 0, (prefix,))
            await self._broadcast(query)
            settle_at = math.inf
            with trio.move_on_after(self._query_timeout) as scope:
                while True:
                    found = self._table.holders(key, trio.current_time())
                    if len(found) >= limit:
                        break
                    if found and settle_at == math.inf:
                        settle_at = trio.current_time() + self._query_settle
                        scope.deadline = min(scope.deadline, settle_at)
                    await arrived.wait()
                    self._lookups[prefix].discard(arrived)
                    arrived = trio.Event()
                    self._lookups[prefix].add(arrived)
        finally:
            events = self._lookups[prefix]
            events.discard(arrived)
            if not events:
                del self._lookups[prefix]
        # Link-local IPv6 last: reaching it needs the scope, which not every dialer handles.
        found = sorted(self._table.holders(key, trio.current_time()), key=lambda s: "%" in s.host)
        return [
            Provider(PeerAddress(sighting.host, sighting.port), NodeId(sighting.node_id), SOURCE)
            for sighting in found[:limit]
        ]


def _host_of(address: Any) -> str:
    """The source host of a datagram, with the interface for IPv6 link-local addresses
    (``fe80::1%eth0``: without it nobody can connect back)."""
    host = str(address[0]).split("%", 1)[0]
    if len(address) == 4 and address[3] and ipaddress.ip_address(host).is_link_local:
        try:
            return f"{host}%{socket.if_indextoname(address[3])}"
        except OSError:
            return f"{host}%{address[3]}"
    return host
