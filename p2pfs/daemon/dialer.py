"""One dialer for every outgoing connection: fetches, swarms and folder links alike.

- An authenticated connection already open to the wanted NodeId is reused (one connection
  per peer pair, shared by fetches, swarms and sync links); connections are leased, and one
  this node opened closes when its last user releases it.
- Candidates are tried concurrently with a short stagger (Happy Eyeballs, RFC 8305: the next
  starts 150 ms after the previous, or at once when it fails), each with a connect timeout
  of a few seconds, so one dead address costs 150 ms, not a timeout.
- Wrong-node, refused, unreachable and "that is this node" candidates are failures of that
  candidate only; the error names every candidate tried, with its reason.
- Host names (typed by users: ``--peer``, ``--bootstrap``) are resolved here.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field

import trio

from p2pfs.address import PeerAddress
from p2pfs.errors import (
    CONNECTION_FAILURES,
    AuthenticationError,
    ConnectionClosedError,
    LocalProtocolError,
    RemoteProtocolError,
)
from p2pfs.ids import NodeId
from p2pfs.net import Endpoint, PeerConnection
from p2pfs.net.connection import is_tunnel

logger = logging.getLogger(__name__)

STAGGER = 0.15
"""RFC 8305's connection attempt delay, within its 100 ms - 2 s range. Below its 250 ms
default because the candidates of a ticket are mostly dead or alive, not slow: measured with
5 dead candidates before a live one, 250 ms gave 1.30 s to the first byte, over the 1 s goal;
a live holder whose handshake takes longer than the stagger still wins the race."""
CONNECT_TIMEOUT = 4.0
"""A QUIC handshake on any real path takes well under a second; a few retransmissions fit."""
MAX_CONCURRENT = 8


@dataclass(frozen=True, slots=True)
class Candidate:
    address: PeerAddress
    """An IP literal, or a host name a user typed (resolved when dialled)."""
    node: NodeId | None
    """The node it must prove to be (pinned), or None: any node, content hashes check it."""
    source: str
    """Where it came from: ticket, peer, member, dht, lan, mainline, relay."""
    relay: NodeId | None = None
    """Set: ``address`` is this relay's, through which ``node`` (pinned) is reached."""

    def __str__(self) -> str:
        if self.relay is not None:
            return f"relay {self.relay.short()} at {self.address} ({self.source})"
        return f"{self.address} ({self.source})"


class DialError(RemoteProtocolError):
    """No candidate gave a usable connection; ``attempts`` says why, per candidate."""

    def __init__(self, attempts: list[tuple[Candidate, str]], what: str = "a holder") -> None:
        self.attempts = attempts
        if attempts:
            tried = "; ".join(f"{candidate}: {reason}" for candidate, reason in attempts)
            message = f"could not reach {what} (tried {tried})"
        else:
            message = f"could not reach {what}: no address to try"
        super().__init__(message)


ServeConnection = Callable[[PeerConnection], Awaitable[None]]
ViaRelay = Callable[[Candidate], Awaitable[PeerConnection]]
Relayed = Callable[[PeerConnection], None]
RelaysFor = Callable[[NodeId], Awaitable[list[Candidate]]]


@dataclass(slots=True)
class _Leases:
    holders: set[Hashable] = field(default_factory=set)
    opened_here: bool = False


class Dialer:
    def __init__(
        self,
        endpoint: Endpoint,
        serve_connection: ServeConnection,
        nursery: trio.Nursery,
        *,
        stagger: float = STAGGER,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._endpoint = endpoint
        self._serve_connection = serve_connection
        self._nursery = nursery
        self.stagger = stagger
        self.timeout = timeout
        self._leases: dict[PeerConnection, _Leases] = {}
        self.via_relay: ViaRelay | None = None
        """Dials a relay candidate (set by the node once its relay client exists)."""
        self.relayed: Relayed | None = None
        """Told of every relayed connection this dialer made (the node punches)."""
        self.relays_for: RelaysFor | None = None
        """Relays that say they relay for a node (the private DHT), asked when nothing
        else reaches it."""

    # -- connections and leases -----------------------------------------------------------

    def open_to(self, node: NodeId) -> PeerConnection | None:
        """An authenticated, open connection to ``node``, whoever opened it; a direct or
        punched one before a relayed one (new work leaves the relay once a punch works)."""
        relayed = None
        for conn in self._endpoint.connections:
            if conn.is_closed:
                continue
            try:
                if conn.peer_id == node:
                    if conn.path != "relayed":
                        return conn
                    relayed = conn
            except ConnectionClosedError:
                continue
        return relayed

    def upgrade(self, relayed: PeerConnection, direct: PeerConnection) -> None:
        """A punched ``direct`` connection joins ``relayed``'s users (who move their new
        work to it through ``open_to``); it closes with the last of them."""
        leases = self._leases.get(relayed)
        holders = set(leases.holders) if leases is not None else set()
        if not holders:
            direct.close_nowait(0, "no longer needed")
            return
        self._leases.setdefault(direct, _Leases()).opened_here = True
        for holder in holders:
            self.acquire(direct, holder)
        self._nursery.start_soon(self._serve_then_forget, direct)

    def acquire(self, conn: PeerConnection, holder: Hashable) -> None:
        self._leases.setdefault(conn, _Leases()).holders.add(holder)

    def release(self, conn: PeerConnection, holder: Hashable) -> None:
        """``holder`` is done with ``conn``; the last user of one we opened closes it."""
        leases = self._leases.get(conn)
        if leases is None:
            return
        leases.holders.discard(holder)
        if not leases.holders:
            del self._leases[conn]
            if leases.opened_here:
                conn.close_nowait(0, "no longer needed")

    def release_all(self, holder: Hashable) -> None:
        for conn in [c for c, leases in self._leases.items() if holder in leases.holders]:
            self.release(conn, holder)

    def _adopt(self, conn: PeerConnection, holder: Hashable) -> None:
        """A connection this dialer opened: serve the peer's streams on it too (one
        connection per pair, used both ways), and forget its leases when it ends."""
        self._leases.setdefault(conn, _Leases()).opened_here = True
        self.acquire(conn, holder)
        self._nursery.start_soon(self._serve_then_forget, conn)

    async def _serve_then_forget(self, conn: PeerConnection) -> None:
        try:
            await self._serve_connection(conn)
        finally:
            self._leases.pop(conn, None)

    # -- dialling -------------------------------------------------------------------------

    async def first(
        self,
        candidates: Iterable[Candidate],
        holder: Hashable,
        *,
        exclude: Iterable[NodeId] = (),
        what: str = "a holder",
        reuse: bool = True,
        relay_lookup: bool = True,
    ) -> PeerConnection:
        """The first candidate that connects and proves the right key (leased to
        ``holder``), or DialError naming every candidate tried. When all fail, relays
        found for the pinned nodes (``relays_for``) are tried too, unless ``relay_lookup``
        is False (dialling a relay itself). ``reuse`` False: a new connection even if one
        is open (to measure a path: ``p2pfs connect``)."""
        excluded = set(exclude)
        wanted = _dedupe(candidates)
        for candidate in wanted if reuse else ():
            if candidate.node is not None and candidate.node not in excluded:
                conn = self.open_to(candidate.node)
                if conn is not None:
                    self.acquire(conn, holder)
                    return conn
        attempts: list[tuple[Candidate, str]] = []
        resolved = [
            c
            for c in await self._resolve(wanted, attempts)
            if c.node is None or c.node not in excluded  # no handshake only to refuse it
        ]
        won = await self._race(resolved, holder, excluded, attempts)
        if won is None and relay_lookup and self.relays_for is not None:
            # Every way we were told of failed: ask who relays for the nodes we want.
            asked = {c.node for c in wanted if c.relay is not None}
            extra: list[Candidate] = []
            for node in dict.fromkeys(c.node for c in wanted if c.node is not None):
                if node not in asked and node not in excluded:
                    extra += await self.relays_for(node)
            won = await self._race(extra, holder, excluded, attempts)
        if won is not None:
            return won
        raise DialError(attempts, what)

    async def _race(
        self,
        candidates: list[Candidate],
        holder: Hashable,
        excluded: set[NodeId],
        attempts: list[tuple[Candidate, str]],
    ) -> PeerConnection | None:
        """Happy Eyeballs over ``candidates``: the first that authenticates, or None."""
        won: list[PeerConnection] = []
        async with trio.open_nursery() as nursery:
            for candidate in candidates:
                failed = trio.Event()
                nursery.start_soon(
                    self._attempt, candidate, holder, excluded, won, attempts, failed, nursery
                )
                with trio.move_on_after(self.stagger):
                    await failed.wait()
        return won[0] if won else None

    async def each(
        self,
        candidates: Iterable[Candidate],
        holder: Hashable,
        *,
        exclude: Iterable[NodeId],
        deliver: Callable[[PeerConnection], None],
    ) -> None:
        """Every candidate reachable now, one connection per node, concurrently (at most
        MAX_CONCURRENT handshakes at once); each handed to ``deliver`` as soon as it is up,
        open ones first. Handing them over only once every dial had ended held a live peer
        back for a dead candidate's whole dial timeout (a fetch whose relay died waited 4 s
        beside its new circuit)."""
        excluded = set(exclude)
        wanted = _dedupe(candidates)
        delivered: set[NodeId] = set()

        def hand_over(conn: PeerConnection) -> None:
            if conn.peer_id in delivered:
                self.release(conn, holder)  # two addresses of one node both answered
                return
            delivered.add(conn.peer_id)
            deliver(conn)

        for candidate in wanted:
            node = candidate.node
            if node is not None and node not in excluded and node not in delivered:
                conn = self.open_to(node)
                if conn is not None:
                    self.acquire(conn, holder)
                    hand_over(conn)
        skip = excluded | delivered
        attempts: list[tuple[Candidate, str]] = []
        resolved = [
            c for c in await self._resolve(wanted, attempts) if c.node is None or c.node not in skip
        ]
        limiter = trio.CapacityLimiter(MAX_CONCURRENT)

        async def one(candidate: Candidate) -> None:
            won: list[PeerConnection] = []
            async with limiter:
                await self._attempt(candidate, holder, skip, won, attempts, trio.Event(), None)
            for conn in won:
                hand_over(conn)

        async with trio.open_nursery() as nursery:
            for candidate in resolved:
                nursery.start_soon(one, candidate)
        for candidate, reason in attempts:
            logger.debug("dial %s failed: %s", candidate, reason)

    async def _attempt(
        self,
        candidate: Candidate,
        holder: Hashable,
        excluded: set[NodeId],
        won: list[PeerConnection],
        attempts: list[tuple[Candidate, str]],
        failed: trio.Event,
        race: trio.Nursery | None,
    ) -> None:
        """One handshake; on success appends to ``won`` (and, in a race, ends the race)."""
        address = candidate.address
        try:
            with trio.fail_after(self.timeout):
                if candidate.relay is not None:
                    conn = await self._through_relay(candidate)
                else:
                    conn = await self._endpoint.connect(
                        (address.host, address.port), candidate.node
                    )
        except AuthenticationError as exc:
            attempts.append((candidate, f"not the node expected ({exc})"))
            failed.set()
            return
        except trio.TooSlowError:
            attempts.append((candidate, f"no answer in {self.timeout:g} s"))
            failed.set()
            return
        except (*CONNECTION_FAILURES, OSError) as exc:
            # StreamResetError: a relay that resets the CONNECT stream (its own handler
            # failed); it escaped into the race's nursery and ended the whole dial.
            attempts.append((candidate, str(exc) or type(exc).__name__))
            failed.set()
            return
        reason = None
        if conn.peer_id == self._endpoint.node_id:
            reason = "that is this node"
        elif conn.peer_id in excluded:
            reason = "excluded (already connected, or refused earlier)"
        elif race is not None and won:
            reason = "another candidate answered first"
        if reason is not None:
            conn.close_nowait(0, reason)
            attempts.append((candidate, reason))
            failed.set()
            return
        self._adopt(conn, holder)
        won.append(conn)
        if conn.path == "relayed" and self.relayed is not None:
            self.relayed(conn)
        if race is not None:
            race.cancel_scope.cancel()

    async def _through_relay(self, candidate: Candidate) -> PeerConnection:
        if self.via_relay is None:
            raise LocalProtocolError("this node does not dial through relays")
        return await self.via_relay(candidate)

    async def _resolve(
        self, candidates: list[Candidate], attempts: list[tuple[Candidate, str]]
    ) -> list[Candidate]:
        """IP literals as they are; host names resolved to each address of a family our
        socket speaks (both on a dual-stack socket: IPv6 and IPv4 alternating, RFC 8305)."""
        endpoint = self._endpoint
        families = endpoint.families
        family = next(iter(families)) if len(families) == 1 else socket.AF_UNSPEC
        resolved: list[Candidate] = []
        for candidate in candidates:
            host = candidate.address.host
            if candidate.relay is not None and candidate.node is None:
                attempts.append((candidate, "a relayed candidate needs the node's NodeId"))
                continue
            if is_tunnel((host,)):
                # A relayed connection's synthetic address (net/tunnel.py), remembered or
                # passed on as if it were the peer's: on an IPv6 socket it would dial into
                # whatever circuit has that number now.
                attempts.append((candidate, "a relay circuit's address, not a peer's"))
                continue
            if _is_ip(host):
                if endpoint.speaks(host):
                    resolved.append(candidate)
                else:
                    attempts.append((candidate, "other address family than this node's socket"))
                continue
            try:
                infos = await trio.socket.getaddrinfo(
                    host, candidate.address.port, family=family, type=socket.SOCK_DGRAM
                )
            except OSError as exc:
                attempts.append((candidate, f"cannot resolve {host!r}: {exc}"))
                continue
            ips = interleave_families(str(info[4][0]) for info in infos if info[0] in families)
            resolved.extend(
                Candidate(
                    PeerAddress(ip, candidate.address.port),
                    candidate.node,
                    candidate.source,
                    candidate.relay,
                )
                for ip in ips
            )
        return _dedupe(resolved)


def _dedupe(candidates: Iterable[Candidate]) -> list[Candidate]:
    """One candidate per address (and relay), the first (best-sourced) kept."""
    seen: dict[tuple[PeerAddress, NodeId | None], Candidate] = {}
    for candidate in candidates:
        seen.setdefault((candidate.address, candidate.relay), candidate)
    return list(seen.values())


def interleave_families(hosts: Iterable[str]) -> list[str]:
    """IP literals in their order within each family, IPv6 and IPv4 alternating from the
    first one's family (RFC 8305 section 4): one family's dead paths cost a stagger each,
    not every address of that family before the other is tried."""
    ordered = list(dict.fromkeys(hosts))
    if not ordered:
        return []
    first_v6 = ":" in ordered[0]
    same = [h for h in ordered if (":" in h) == first_v6]
    other = [h for h in ordered if (":" in h) != first_v6]
    mixed: list[str] = []
    for index in range(max(len(same), len(other))):
        mixed.extend(group[index] for group in (same, other) if index < len(group))
    return mixed


def _is_ip(host: str) -> bool:
    """An IP literal, a link-local IPv6 one with its ``%interface`` included (as LAN
    discovery hears peers): dialled as it is, its interface kept."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
