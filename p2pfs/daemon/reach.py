"""Reaching beyond direct addresses (SPEC "Relays and hole punching"): the relay service
(``--relay``), the home relays this node stays registered with, hole punching beside
relayed connections, and finding the relays that relay for a node.

The node hands this the control streams its peers open; the dialer asks it to dial through
relays, tells it of each relayed connection it made (to punch beside it), and asks it who
relays for a node that nothing else reached.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from p2pfs.address import PeerAddress
from p2pfs.discovery.keys import relay_for_discovery_key, relays_discovery_key
from p2pfs.discovery.seam import Finder
from p2pfs.errors import CONNECTION_FAILURES, P2pfsError, first_leaf
from p2pfs.ids import NodeId
from p2pfs.net import Endpoint, PeerConnection, Stream
from p2pfs.net.control import ControlKind, Decoder, Incoming, Refuse, RefuseCode, encode
from p2pfs.wire.ticket import RelayHint

from .addresses import AddressBook
from .dialer import Candidate, Dialer
from .punch import PUNCH_OUTCOMES_KEPT, Puncher, PunchOutcome
from .relay import RelayLimits, RelayService, read_first_untrusted
from .relayclient import RelayClient, RelayRoute

logger = logging.getLogger(__name__)

ANNOUNCE_RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 30.0)
RETIRE_AFTER = 1.0
"""Grace before a relayed connection with a punched twin closes."""
RELAYS_FOR_TTL = 30.0
"""How long a node's relays found in the DHT (or that none were) are believed."""
RELAYS_FOR_KEPT = 256
PUNCH_RETRY_DELAYS = (10.0, 30.0, 60.0, 120.0, *(300.0,) * 12)
"""When to punch again beside a relayed connection still in use (about an hour in all)."""


class Reach:
    def __init__(
        self,
        own: NodeId,
        relay: RelayLimits | None,
        relay_via: tuple[PeerAddress, ...],
        known: tuple[PeerAddress, ...],
    ) -> None:
        """``relay``: serve as a relay within these limits; ``relay_via``: the relays to
        stay registered with (none: find them); ``known``: --peer and --bootstrap nodes,
        the first places to look for relays."""
        self._own = own
        self._relay_via = relay_via
        self._known = known
        self._dht: Finder | None = None
        self.service = (
            RelayService(relay, announce=self._announce, withdraw=self._withdraw)
            if relay is not None
            else None
        )
        self._client: RelayClient | None = None
        self._puncher: Puncher | None = None
        self._dialer: Dialer | None = None
        self._addresses: AddressBook | None = None
        self._needs_relay: Callable[[], bool] = lambda: False
        self._nursery: trio.Nursery | None = None
        self._punch_outcomes: OrderedDict[PeerConnection, PunchOutcome] = OrderedDict()
        self._relays_for_cache: OrderedDict[NodeId, tuple[float, list[Candidate]]] = OrderedDict()

    async def serve(
        self,
        endpoint: Endpoint,
        dialer: Dialer,
        addresses: AddressBook,
        dht: Finder,
        *,
        needs_relay: Callable[[], bool] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled (``dht`` may start serving later: announcements wait).
        ``needs_relay``: whether peers elsewhere cannot reach us directly (default: a peer
        saw us through a NAT)."""
        self._dht = dht
        self._needs_relay = needs_relay or addresses.seen_through_nat
        self._dialer = dialer
        self._addresses = addresses
        self._puncher = Puncher(endpoint, self._punch_candidates)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.service is not None:
                self.service.attach(endpoint)
                nursery.start_soon(self._announce_until_done, relays_discovery_key())
            # A relay is reachable itself; it still registers where told to (--relay-via).
            find = self._find_relays if self.service is None else None
            self._client = RelayClient(
                endpoint,
                self._relay_via,
                self._dial_relay,
                dialer.release,
                nursery,
                find_relays=find,
            )
            dialer.via_relay = self._via_relay
            dialer.relayed = self._relayed
            dialer.relays_for = self._relays_for
            await nursery.start(self._client.serve)
            task_status.started()

    # -- what the node asks ---------------------------------------------------------------

    def hints(self) -> tuple[RelayHint, ...]:
        """The relays we are registered with now, for tickets and ``id``."""
        if self._client is None:
            return ()
        return tuple(RelayHint(route.relay, route.address) for route in self._client.routes)

    def relay_info(self) -> dict[str, Any] | None:
        return self.service.info() if self.service is not None else None

    def punch_info(self) -> dict[str, int]:
        puncher = self._puncher
        return {
            "attempts": puncher.attempts if puncher else 0,
            "successes": puncher.successes if puncher else 0,
        }

    def mark(self, conn: PeerConnection) -> None:
        """A new authenticated connection: punched, if it came from a peer we punched to."""
        if self._puncher is not None:
            self._puncher.mark(conn)

    async def control(self, conn: PeerConnection, kind: ControlKind, stream: Stream) -> None:
        """One control stream a peer opened (the node guards it)."""
        decoder = Decoder()
        first = await read_first_untrusted(stream, decoder)
        if kind is ControlKind.PUNCH and self._puncher is not None:
            await self._puncher.respond(conn, stream, first, decoder)
        elif isinstance(first, Incoming) and self._client is not None:
            await self._client.incoming(conn, stream, first, decoder)
        elif self.service is not None:
            await self.service.handle(conn, stream, first, decoder)
        else:
            await stream.send_all(encode(Refuse(RefuseCode.NOT_A_RELAY, "not a relay")))
            await stream.send_eof()

    async def punch_outcome(self, relayed: PeerConnection) -> PunchOutcome | None:
        """How the punch beside ``relayed`` (a connection we dialled) ended; None if none
        was tried."""
        outcome = self._punch_outcomes.get(relayed)
        if outcome is None:
            return None
        await outcome.done.wait()
        return outcome

    # -- relays ---------------------------------------------------------------------------

    async def _announce(self, key: bytes) -> bool:
        """Announce in the private DHT; a failure is logged, never the caller's (a relay
        registration must not end because the DHT is down). Whether it was sent."""
        if self._dht is None:
            return False
        try:
            await self._dht.announce(key)
        except (OSError, P2pfsError) as exc:
            logger.info("announcing %s in the DHT failed: %s", key.hex()[:12], exc)
            return False
        return True

    async def _announce_until_done(self, key: bytes) -> None:
        """The relays key, announced once the DHT serves (the DHT re-announces it after)."""
        for delay in ANNOUNCE_RETRY_DELAYS:
            if await self._announce(key):
                return
            await trio.sleep(delay)
        while not await self._announce(key):
            await trio.sleep(ANNOUNCE_RETRY_DELAYS[-1])

    async def _withdraw(self, key: bytes) -> None:
        if self._dht is not None:
            try:
                await self._dht.withdraw(key)
            except (OSError, P2pfsError) as exc:
                logger.info("withdrawing %s from the DHT failed: %s", key.hex()[:12], exc)

    async def _find_relays(self) -> list[tuple[PeerAddress, NodeId | None]]:
        """Where a relay may be: our --peer and --bootstrap nodes first (a refusal says
        they are not), then, once a peer has seen us through a NAT or its dial-back could
        not reach us, relays that announce themselves in the private DHT (a lookup a node
        that needs none does not make)."""
        found: dict[PeerAddress, NodeId | None] = dict.fromkeys(self._known)
        if self._dht is not None and self._needs_relay():
            try:
                providers = await self._dht.find(relays_discovery_key())
            except (OSError, P2pfsError) as exc:
                logger.info("looking for relays in the DHT failed: %s", exc)
                providers = []
            for provider in providers:
                if provider.node_id != self._own:
                    found.setdefault(provider.address, provider.node_id)
        return list(found.items())

    async def _relays_for(self, node: NodeId) -> list[Candidate]:
        """Relays that announce that ``node`` is registered with them; asked at most once
        every RELAYS_FOR_TTL per node (a fetch redialling a dead holder asks each round)."""
        if self._dht is None:
            return []
        now = trio.current_time()
        cached = self._relays_for_cache.get(node)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            providers = await self._dht.find(relay_for_discovery_key(node.raw))
        except (OSError, P2pfsError) as exc:
            logger.info("looking up relays for %s failed: %s", node.short(), exc)
            providers = []
        found = [
            Candidate(provider.address, node, "relay (dht)", provider.node_id)
            for provider in providers
            if provider.node_id is not None and provider.node_id != node
        ]
        self._relays_for_cache[node] = (now + RELAYS_FOR_TTL, found)
        while len(self._relays_for_cache) > RELAYS_FOR_KEPT:
            self._relays_for_cache.popitem(last=False)
        return found

    async def _dial_relay(
        self, address: PeerAddress, relay: NodeId | None, holder: object
    ) -> PeerConnection:
        assert self._dialer is not None
        candidate = Candidate(address, relay, "relay")
        return await self._dialer.first([candidate], holder, what="the relay", relay_lookup=False)

    async def _via_relay(self, candidate: Candidate) -> PeerConnection:
        assert self._client is not None and candidate.relay is not None
        assert candidate.node is not None
        route = RelayRoute(candidate.relay, candidate.address)
        return await self._client.connect(route, candidate.node)

    # -- punching -------------------------------------------------------------------------

    def _relayed(self, conn: PeerConnection) -> None:
        """A connection we made through a relay: try to punch a direct path beside it."""
        assert self._nursery is not None
        self._nursery.start_soon(self._punch, conn)

    async def _punch(self, relayed: PeerConnection) -> None:
        """Punch beside ``relayed`` now, and again later while it stays in use and no direct
        path to its peer exists: a NAT that saw the peer's packets unasked (a DHT lookup,
        an earlier try) refuses the punch until that flow expires."""
        assert self._dialer is not None
        outcome = PunchOutcome()
        self._punch_outcomes[relayed] = outcome
        while len(self._punch_outcomes) > PUNCH_OUTCOMES_KEPT:
            self._punch_outcomes.popitem(last=False)
        direct = await self._punch_once(relayed)
        if direct is not None:
            outcome.direct = direct
            outcome.seconds = trio.current_time() - outcome.started
        outcome.done.set()
        for delay in PUNCH_RETRY_DELAYS:
            if direct is not None:
                self._dialer.upgrade(relayed, direct)
                await self._retire(relayed)
                return
            await trio.sleep(delay)
            current = self._dialer.open_to(relayed.peer_id) if not relayed.is_closed else None
            if current is None or current.path != "relayed":
                return  # the relayed connection ended, or another path exists now
            direct = await self._punch_once(relayed)

    async def _retire(self, relayed: PeerConnection) -> None:
        """Close a relayed connection once a direct one to its peer is up (after a short
        grace for what is in flight): its users, a fetch's worker or a folder link, fail
        over to the direct connection the dialer now prefers, instead of staying on the
        relay for as long as they run."""
        await trio.sleep(RETIRE_AFTER)
        relayed.close_nowait(0, "moved to a direct path")

    async def _punch_once(self, relayed: PeerConnection) -> PeerConnection | None:
        assert self._puncher is not None
        try:
            return await self._puncher.initiate(relayed)
        except* CONNECTION_FAILURES as group:
            # Its dials run in a nursery: their errors come in a group (a plain except
            # missed one, and it ended the daemon).
            logger.info("punch over %r failed: %s", relayed, first_leaf(group))
        return None

    def _punch_candidates(self) -> list[PeerAddress]:
        """Where peers may reach us directly: our addresses, then every observed one
        (unconfirmed too: a punch goes only to a peer that authenticated)."""
        assert self._addresses is not None
        own = self._addresses.all()
        return own + [a for a, _ in self._addresses.observations() if a not in own]
