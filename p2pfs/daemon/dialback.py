"""Dial-back checks of reachability (SPEC "Reachability by dial-back"), both sides.

Asking: a node opens a DIAL_BACK control stream to a peer elsewhere with a fresh nonce and
the port peers should reach it at, and waits for the probe on its UDP port. "Elsewhere":
not on one of our links, whose word says nothing of the way in from beyond our router (nor,
when peers see us at a global address, at a non-global one: a neighbour in our own site).
It is asked only about an address we advertise: the probe goes where that peer sees our
packets come from, and on IPv6 that is often a temporary address no peer is told of, so
the request then names our stable address in the same /64.

Answering: a node sends probes (``0x05 | nonce``) to that port at the IP address it sees
the connection come from, from a new socket of its own, so that no firewall or NAT on the
asker's side has seen that source port, then answers PROBED. Only that IP: nobody can aim
our probes at a third host, and a probe is no bigger than the request that asked for it.
Each place (the asker's /24 or /48) may ask once per ANSWER_EVERY, and all together
ANSWERS_PER_MINUTE times a minute.

The asker keeps the outcome per address family (reachability.py); the node then treats a
family nobody could reach as it treats a NAT: it looks for relays and stays a DHT client.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import secrets
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence

import trio

from p2pfs.address import PeerAddress, plain_address
from p2pfs.errors import (
    CONNECTION_FAILURES,
    ConnectionClosedError,
    LocalProtocolError,
    first_leaf,
)
from p2pfs.net import Endpoint, PeerConnection, Stream
from p2pfs.net.boundary import describe, split_fatal
from p2pfs.net.control import (
    NONCE_LEN,
    PROBE_DATAGRAM,
    ControlError,
    ControlKind,
    ControlMessage,
    Decoder,
    DialBack,
    Probed,
    Refuse,
    RefuseCode,
    encode,
    probe_datagram,
    probe_nonce_untrusted,
)

from .addresses import AddressBook, interface_networks, on_our_links, place_of
from .dialer import Candidate, Dialer
from .reachability import Outcome, Reachability
from .relay import read_first_untrusted

logger = logging.getLogger(__name__)

PROBE_SCHEDULE = (0.0, 0.1, 0.3)
"""When the probes leave (seconds after the request): three, against a lost datagram."""
PROBE_WAIT = 1.0
"""After PROBED, how long a probe may still be on its way before it counts as lost."""
ASK_TIMEOUT = 10.0
DIAL_TIMEOUT = 6.0
ASK_AGAIN = 600.0
"""The same peer (or known address) is asked at most this often."""
ASK_AGAIN_AFTER_FAILURE = 60.0
"""A peer that could not answer (the connection closed) is asked again sooner."""
ASK_AGAIN_WHEN_BUSY = 15.0
"""A peer that said BUSY (asked by someone in our place within ANSWER_EVERY: a daemon
restarted, a neighbour) is asked again once that has passed."""
LINGER = 2.0
"""A connection dialled only to ask stays open after the ask, up to this long, while the
peer is asking us in turn on it (offered our connection as a new one: a bootstrap node
meets peers to ask no other way)."""
ROUND = 5.0
"""How often the asking side looks whether a check is due and a peer is there to ask."""
ANSWER_EVERY = 10.0
ANSWERS_PER_MINUTE = 60
CONTACTS_PER_CHECK = 2
"""DHT contacts dialled at most per check (after the known nodes): one that runs its DHT
on a port of its own answers no dial there, and each such dial waits DIAL_TIMEOUT."""


def family_of(host: str) -> int | None:
    """4 or 6 for an IP literal (a v4-mapped one is 4), None for anything else."""
    address = plain_address(host)
    return None if address is None else address.version


def probe_target(path: str, remote_host: str, request: DialBack) -> tuple[str, int] | None:
    """Where the probes go for a peer whose connection (``path``) comes from
    ``remote_host``: that IP (or the IPv6 address it names in that address's /64), at the
    port it names; None where that is no address to send to (a relay tunnel, a link-local,
    multicast or unspecified address, a named address in another /64 or one that stands
    for other hosts)."""
    address = plain_address(remote_host)
    if path == "relayed" or address is None:
        return None
    if request.host is not None:
        named = ipaddress.IPv6Address(request.host)
        if not (
            isinstance(address, ipaddress.IPv6Address)
            and same_slash64(named, address)
            and not _translated(named)
        ):
            return None
        address = named
    if address.is_link_local or address.is_multicast or address.is_unspecified:
        return None
    return str(address), request.port


def same_slash64(one: ipaddress.IPv6Address, other: ipaddress.IPv6Address) -> bool:
    return int(one) >> 64 == int(other) >> 64


_TRANSLATION_PREFIXES = tuple(
    ipaddress.IPv6Network(prefix)
    for prefix in ("::/96", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "2001::/32")
)
"""IPv4-compatible, v4-mapped, NAT64 (RFC 6052, 8215) and Teredo: a /64 of these spans other
people's IPv4 hosts, so a named address there could aim our probes at any of them."""


def _translated(address: ipaddress.IPv6Address) -> bool:
    return address.is_loopback or any(address in prefix for prefix in _TRANSLATION_PREFIXES)


class Answer(enum.Enum):
    """How one ask ended."""

    REACHED = "reached"
    """A probe with our nonce arrived."""
    NOT_REACHED = "not reached"
    """The peer sent its probes (PROBED) and none arrived within PROBE_WAIT."""
    REFUSED = "refused"
    """The peer refused, broke the protocol or reset the stream (an older node): asked
    again only after ASK_AGAIN."""
    LOST = "lost"
    """The connection ended or the answer never came: asked again soon."""
    BUSY = "busy"
    """The peer refused for now (BUSY): asked again after ASK_AGAIN_WHEN_BUSY."""
    UNDECIDED = "undecided"
    """Our record of where we sent overflowed meanwhile (net/recent.py): no probe could
    count, so neither way is known; asked again as after LOST."""


class DialBackService:
    def __init__(
        self,
        endpoint: Endpoint,
        addresses: AddressBook,
        reachability: Reachability,
        *,
        dialer: Dialer | None = None,
        known: tuple[PeerAddress, ...] = (),
        contacts: Callable[[], Awaitable[Sequence[PeerAddress]]] | None = None,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        """``known``: --peer, --bootstrap and --relay-via nodes, dialled to ask when no open
        connection goes elsewhere; ``contacts``: the nodes of our DHT's routing table
        (reachable nodes all: DHT clients join no table), dialled after the known ones;
        ``changed``: called when a check ended."""
        self._endpoint = endpoint
        self._addresses = addresses
        self.reachability = reachability
        self._dialer = dialer
        self._known = known
        self._contacts = contacts
        self._changed = changed
        self._waiting: dict[bytes, trio.Event] = {}
        self._asked: dict[Hashable, float] = {}
        """NodeIds, and (configured node's or DHT contact's address, family) pairs -> when
        last asked (or dialled); kept for ASK_AGAIN."""
        self._answered: dict[str, float] = {}
        """Places of askers -> when we last probed for one of them."""
        self._answers: deque[float] = deque()
        self._checking: set[int] = set()
        """Families with a check under way (one at a time each)."""
        self._nursery: trio.Nursery | None = None
        self._answering: dict[PeerConnection, int] = {}
        """Connections with a dial-back of ours to their peer under way."""

    # -- answering ------------------------------------------------------------------------

    async def control(self, conn: PeerConnection, stream: Stream) -> None:
        """A DIAL_BACK control stream a peer opened (the node guards it)."""
        await self.respond(conn, stream, await read_first_untrusted(stream, Decoder()))

    async def respond(self, conn: PeerConnection, stream: Stream, first: ControlMessage) -> None:
        """A peer asks us to probe it."""
        if not isinstance(first, DialBack):
            raise ControlError("a dial-back stream must start with DIAL_BACK")
        target = probe_target(conn.path, str(conn.remote_address[0]), first)
        refusal: Refuse | None
        if target is None:
            refusal = Refuse(RefuseCode.UNEXPECTED, "no address of yours to probe")
        else:
            refusal = self._refusal(target[0])
            if refusal is None:
                self._answering[conn] = self._answering.get(conn, 0) + 1
                try:
                    await self._send_probes(target, first.nonce)
                except OSError as exc:
                    refusal = Refuse(RefuseCode.UNAVAILABLE, f"cannot probe: {exc.strerror or exc}")
                finally:
                    self._answering[conn] -= 1
                    if not self._answering[conn]:
                        del self._answering[conn]
        await stream.send_all(encode(refusal or Probed()))
        await stream.aclose()  # FIN, and nothing more read: the stream is done both ways

    def _refusal(self, host: str) -> Refuse | None:
        """BUSY when the asker's place (a NodeId costs nothing to make) asked within
        ANSWER_EVERY, or everyone together ANSWERS_PER_MINUTE times in the last minute."""
        now = trio.current_time()
        place = place_of(ipaddress.ip_address(host))
        if self._answered.get(place, -ANSWER_EVERY) > now - ANSWER_EVERY:
            return Refuse(RefuseCode.BUSY, "asked too often")
        while self._answers and self._answers[0] <= now - 60.0:
            self._answers.popleft()
        if len(self._answers) >= ANSWERS_PER_MINUTE:
            return Refuse(RefuseCode.BUSY, "too many dial-backs")
        self._answered[place] = now
        self._answers.append(now)
        for stale in [p for p, at in self._answered.items() if at <= now - ANSWER_EVERY]:
            del self._answered[stale]
        return None

    async def _send_probes(self, target: tuple[str, int], nonce: bytes) -> None:
        """Every probe, from a socket of its own (a port the asker never sent to)."""
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        datagram = probe_datagram(nonce)
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            started = trio.current_time()
            for offset in PROBE_SCHEDULE:
                await trio.sleep_until(started + offset)
                await sock.sendto(datagram, target)

    # -- asking ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check each family whenever it is due and a peer elsewhere can be asked."""
        probe = bytes([PROBE_DATAGRAM])
        self._endpoint.set_datagram_handler(probe, self._on_probe)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._rounds()
        finally:
            self._nursery = None
            self._endpoint.set_datagram_handler(probe, None)

    async def _rounds(self) -> None:
        seen = self._where_we_are()
        while True:
            now_at = self._where_we_are()
            if now_at != seen:
                # Another network, another mapping: what was found was of the old one.
                seen = now_at
                self.reachability.forget()
                self._asked.clear()
                self._changed()
            for family in self._families():
                if self._due(family):
                    await _contained(self._check(family))
            stale = trio.current_time() - ASK_AGAIN
            for key in [key for key, at in self._asked.items() if at <= stale]:
                del self._asked[key]
            await trio.sleep(ROUND)

    def offer(self, conn: PeerConnection) -> None:
        """A new authenticated connection: its peer is asked at once if a check of its
        family is due and it is elsewhere (connections come and go between rounds)."""
        if self._nursery is not None:
            self._nursery.start_soon(_contained, self._offered(conn))

    async def _offered(self, conn: PeerConnection) -> None:
        family = family_of(str(conn.remote_address[0]))
        if family is None or not self._due(family):
            return
        now = trio.current_time()
        if self.reachability.confirming(family, now) and _place(conn) in (
            self.reachability.places(family, now)
        ):
            return  # heard from already: it settles nothing
        if self._eligible(conn, family, now, interface_networks()):
            self._checking.add(family)
            try:
                await self._ask(conn, family)
            finally:
                self._checking.discard(family)

    def _due(self, family: int) -> bool:
        now = trio.current_time()
        return family not in self._checking and self.reachability.due(family, now) <= now

    def _eligible(
        self,
        conn: PeerConnection,
        family: int,
        now: float,
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> bool:
        """Whether ``conn``'s peer may be asked now: a direct path of ``family`` to a node
        beyond our links (and beyond our site, when it sees us at a global address), not
        asked within ASK_AGAIN, that sees us at an address we advertise (or, on IPv6, in
        the /64 of one)."""
        host = str(conn.remote_address[0])
        if not (
            conn.authenticated
            and conn.path != "relayed"
            and family_of(host) == family
            and not on_our_links(host, networks)
            and self._asked.get(conn.peer_id, -ASK_AGAIN) <= now - ASK_AGAIN
            and self.request_for(conn) is not None
        ):
            return False
        observed = conn.observed_address
        assert observed is not None  # request_for needs it
        return _is_global(host) or not _is_global(str(observed[0]))

    def request_for(self, conn: PeerConnection) -> DialBack | None:
        """What to ask ``conn``'s peer (a fresh nonce), or None if it sees us at no
        address we advertise: the verdict would be about an address nobody is told of."""
        observed = conn.observed_address
        if observed is None:
            return None
        seen = str(observed[0])
        mapped = self._addresses.gateway_mapping
        if mapped is not None and seen == mapped.host:
            return DialBack(secrets.token_bytes(NONCE_LEN), mapped.port)
        port = self._addresses.port
        advertised = [address.host for address in self._addresses.all()]
        if seen in advertised:
            return DialBack(secrets.token_bytes(NONCE_LEN), port)
        if family_of(seen) != 6:
            return None
        seen6 = ipaddress.IPv6Address(seen.split("%", 1)[0])
        for host in advertised:
            if family_of(host) == 6 and same_slash64(ipaddress.IPv6Address(host), seen6):
                return DialBack(secrets.token_bytes(NONCE_LEN), port, host)
        return None

    async def _check(self, family: int) -> None:
        """Ask one peer elsewhere (an open connection's, else a known node's), if any."""
        self._checking.add(family)
        try:
            await self._check_one(family)
        finally:
            self._checking.discard(family)

    async def _check_one(self, family: int) -> None:
        """Ask an open connection's peer elsewhere, else a configured node, else up to
        CONTACTS_PER_CHECK nodes of our DHT's routing table. A check that is to confirm
        (one place heard from, or places that disagree) asks only a place not heard from
        yet: asking one again every CONFIRM_SOON settled nothing and cost a dial."""
        now = trio.current_time()
        counted = self.reachability.places(family, now)
        new_place_only = self.reachability.confirming(family, now)
        networks = interface_networks()
        servers = [
            conn
            for conn in self._endpoint.connections
            if self._eligible(conn, family, now, networks)
            and not (new_place_only and _place(conn) in counted)
        ]
        # A place not heard from yet first: a second place confirms or contradicts.
        servers.sort(key=lambda conn: _place(conn) in counted)
        if servers:
            await self._ask(servers[0], family)
            return
        contacts = await self._contacts_to_dial(family, now, counted, networks, new_place_only)
        for address in [*self._known, *contacts]:
            if self._asked.get((address, family), -ASK_AGAIN) > now - ASK_AGAIN:
                continue
            target = await self._known_target(address, family, networks)
            if target is not None and new_place_only and _place_of_host(target.host) in counted:
                # Heard from: looked at again in a minute (not every round: a name is
                # resolved each time), and asked once the check no longer confirms.
                self._asked[(address, family)] = now - ASK_AGAIN + ASK_AGAIN_AFTER_FAILURE
                continue
            self._asked[(address, family)] = now
            if target is None:
                continue
            conn = self._open_to(target)
            lease = object()
            if conn is not None and self._dialer is not None:
                self._dialer.acquire(conn, lease)
            elif conn is None:
                conn = await self._dial(target, lease)
            if conn is None:
                if address in self._known:  # a DHT contact waits ASK_AGAIN: it may run
                    # its DHT on a port of its own, where no dial is answered
                    self._asked[(address, family)] = now - ASK_AGAIN + ASK_AGAIN_AFTER_FAILURE
                continue
            try:
                if self._eligible(conn, family, now, networks):
                    await self._ask(conn, family)
                    # Asked again when its node is (sooner after a lost or busy ask).
                    self._asked[(address, family)] = self._asked.get(conn.peer_id, now)
                    await self._linger(conn)
                    return
            finally:
                if self._dialer is not None:
                    self._dialer.release(conn, lease)

    async def _contacts_to_dial(
        self,
        family: int,
        now: float,
        counted: frozenset[str],
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
        new_place_only: bool,
    ) -> list[PeerAddress]:
        """Up to CONTACTS_PER_CHECK routing-table nodes of ``family`` beyond our links, not
        asked within ASK_AGAIN, places not heard from yet first (only those when
        ``new_place_only``, a check to confirm). Why: a node with no connection and no
        configured node beyond its links was never checked (a LAN neighbour as its only
        bootstrap, say). A routing table's node is reached at its DHT port, which is its
        node port unless it runs the DHT on a port of its own."""
        if self._contacts is None:
            return []
        fresh = [
            address
            for address in await self._contacts()
            if family_of(address.host) == family
            and not on_our_links(address.host, networks)
            and self._asked.get((address, family), -ASK_AGAIN) <= now - ASK_AGAIN
            and not (new_place_only and _place_of_host(address.host) in counted)
        ]
        secrets.SystemRandom().shuffle(fresh)
        fresh.sort(key=lambda address: _place_of_host(address.host) in counted)
        return fresh[:CONTACTS_PER_CHECK]

    async def _known_target(
        self,
        address: PeerAddress,
        family: int,
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> PeerAddress | None:
        """The known node's address of ``family`` beyond our links (a name resolved first:
        a --peer nas.local on our LAN is no one to ask), or None."""
        if self._dialer is None:
            return None
        hosts = [address.host]
        if family_of(address.host) is None:
            try:
                found = await trio.socket.getaddrinfo(
                    address.host, address.port, type=socket.SOCK_DGRAM
                )
            except OSError as exc:
                logger.debug("dial-back: cannot resolve %s: %s", address.host, exc)
                return None
            hosts = [str(entry[4][0]) for entry in found]
        for host in hosts:
            if family_of(host) == family and not on_our_links(host, networks):
                return PeerAddress(host.split("%", 1)[0], address.port)
        return None

    def _open_to(self, target: PeerAddress) -> PeerConnection | None:
        """An open direct connection to ``target`` (reused rather than dialling again)."""
        for conn in self._endpoint.connections:
            if (
                conn.authenticated
                and conn.path != "relayed"
                and (str(conn.remote_address[0]), int(conn.remote_address[1]))
                == (target.host, target.port)
            ):
                return conn
        return None

    async def _linger(self, conn: PeerConnection) -> None:
        """Keep a connection we dialled to ask open while its peer asks us in turn: from
        when its request may arrive (two round trips, at least half a second) until we
        answered it, up to LINGER."""
        started = trio.current_time()
        soonest = started + max(0.5, 2 * (conn.smoothed_rtt or 0.0))
        with trio.move_on_after(LINGER):
            while conn in self._answering or trio.current_time() < soonest:
                await trio.sleep(0.05)  # a few polls, once per dialled ask

    async def _dial(self, address: PeerAddress, lease: object) -> PeerConnection | None:
        assert self._dialer is not None
        candidate = Candidate(address, None, "dial-back")
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                return await self._dialer.first(
                    [candidate], lease, what="a node to check reachability", relay_lookup=False
                )
        except (trio.TooSlowError, *CONNECTION_FAILURES) as exc:
            logger.debug("dial-back: cannot reach %s: %s", address, exc)
            return None

    async def _ask(self, conn: PeerConnection, family: int) -> None:
        """Ask ``conn``'s peer and record what came of it; the connection is leased
        meanwhile (its other users may let go of it)."""
        peer = conn.peer_id
        request = self.request_for(conn)
        if request is None:
            return
        self._asked[peer] = trio.current_time()
        lease = object()
        if self._dialer is not None:
            self._dialer.acquire(conn, lease)
        try:
            answer = await self.ask(conn, request)
        finally:
            if self._dialer is not None:
                self._dialer.release(conn, lease)
        if answer is Answer.UNDECIDED and not self.reachability.places(family, trio.current_time()):
            # Flooded for so long that every outcome expired: the cheaper mistake (a relay,
            # a DHT client) rather than "unknown", which a firewalled node would read as
            # no need for a relay.
            answer = Answer.NOT_REACHED
        if answer in (Answer.LOST, Answer.UNDECIDED):
            self._asked[peer] = trio.current_time() - ASK_AGAIN + ASK_AGAIN_AFTER_FAILURE
        elif answer is Answer.BUSY:
            self._asked[peer] = trio.current_time() - ASK_AGAIN + ASK_AGAIN_WHEN_BUSY
        if answer not in (Answer.REACHED, Answer.NOT_REACHED):
            return
        reached = answer is Answer.REACHED
        outcome = Outcome(reached, trio.current_time(), peer.short())
        self.reachability.record(family, _place(conn), outcome)
        logger.info(
            "dial-back by %s at %s to %s: its probe %s; IPv%d %s",
            peer.short(),
            conn.remote_address[0],
            request.host or (conn.observed_address or ("?",))[0],
            "arrived" if reached else "never arrived",
            family,
            self.reachability.verdict(family, outcome.at).value,
        )
        self._changed()

    def _where_we_are(self) -> tuple[frozenset[str], PeerAddress | None]:
        return self._addresses.interfaces_now(), self._addresses.gateway_mapping

    def _families(self) -> list[int]:
        return [6 if family == socket.AF_INET6 else 4 for family in self._endpoint.families]

    def _on_probe(self, data: bytes, source: tuple[str, int]) -> None:
        nonce = probe_nonce_untrusted(data)
        arrived = self._waiting.get(nonce) if nonce is not None else None
        if arrived is None:
            return
        if self._endpoint.sent_to.includes(str(source[0]), int(source[1])):
            # Our firewall lets in what comes from where our port sent (net/recent.py):
            # such a probe proves nothing (an honest peer probes from a socket of its
            # own). A peer that sent it so, from its connection's port or from one it got
            # us to send to (a DHT contact or a punch candidate it named), would make a
            # firewalled node believe itself reachable, and so never look for a relay.
            logger.info("dial-back: a probe from %s, where we sent, ignored", source[0])
            return
        arrived.set()

    async def ask(self, conn: PeerConnection, request: DialBack) -> Answer:
        """Send ``request`` to ``conn``'s peer and wait for its probe."""
        arrived = trio.Event()
        self._waiting[request.nonce] = arrived
        answer = [Answer.LOST]
        stream: Stream | None = None
        failure: BaseException | None = None
        try:
            with trio.move_on_after(ASK_TIMEOUT):
                stream = await conn.open_control(ControlKind.DIAL_BACK, encode(request))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_answer, stream, answer, nursery.cancel_scope)
                    await arrived.wait()
                    nursery.cancel_scope.cancel()
        except* CONNECTION_FAILURES as group:
            failure = first_leaf(group)
        finally:
            self._waiting.pop(request.nonce, None)
            if stream is not None:
                stream.close_nowait()  # an early probe leaves the answer unread
        if self._endpoint.sent_to.overflowed():
            # Every probe is doubted meanwhile (net/recent.py): neither way is known.
            logger.info("dial-back by %s: undecided, too many destinations", conn.peer_id.short())
            return Answer.UNDECIDED
        if arrived.is_set() and failure is None:
            return Answer.REACHED
        if failure is not None:
            logger.info("dial-back by %s failed: %s", conn.peer_id.short(), failure)
            lost = isinstance(failure, ConnectionClosedError | LocalProtocolError)
            return Answer.LOST if lost else Answer.REFUSED
        return answer[0]

    async def _read_answer(
        self, stream: Stream, answer: list[Answer], done: trio.CancelScope
    ) -> None:
        message = await read_first_untrusted(stream, Decoder())
        if isinstance(message, Refuse):
            logger.info("dial-back refused: %s (%s)", message.reason, message.code.name)
            answer[0] = Answer.BUSY if message.code is RefuseCode.BUSY else Answer.REFUSED
        elif isinstance(message, Probed):
            await trio.sleep(PROBE_WAIT)
            answer[0] = Answer.NOT_REACHED
        else:
            raise ControlError(f"answered DIAL_BACK with {type(message).__name__}")
        done.cancel()


async def _contained(check: Awaitable[None]) -> None:
    """One check is a failure boundary (as control streams are, relay.guard): anything but
    cancellation ends it alone, with a log line."""
    try:
        await check
    except BaseException as exc:
        fatal, failure = split_fatal(exc)
        if failure is not None:
            logger.error("dial-back check failed: %s", describe(failure))  # noqa: TRY400
        if fatal is exc:
            raise
        if fatal is not None:
            raise fatal from None


def _is_global(host: str) -> bool:
    address = plain_address(host)
    return address is not None and address.is_global


def _place(conn: PeerConnection) -> str:
    return _place_of_host(str(conn.remote_address[0]))


def _place_of_host(host: str) -> str:
    address = plain_address(host)
    return host if address is None else place_of(address)
