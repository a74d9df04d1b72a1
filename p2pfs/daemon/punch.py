"""Hole punching over a relayed connection (SPEC "Relays and hole punching").

Once two nodes talk through a relay, the one that dialled (A) opens a PUNCH control stream
on that end-to-end connection and sends CANDIDATES: where it may be reached directly (its
interface addresses and every address peers observed it at). The other (B) sends a one-byte
datagram to each of A's, which opens B's NAT mapping toward A (B's router then lets A's
packets in), then answers with its own candidates, and sends a few more datagrams while A's
Initials may be on their way. A, on B's answer, dials B's candidates
directly with B's NodeId pinned; its Initial opens A's own mapping. The first handshake
that authenticates is the punched connection: new work goes there (the dialer prefers it)
and the relayed one closes once its users let go. Behind a NAT that maps every destination
to a new port (symmetric, ``masquerade fully-random``), the observed ports are wrong for
the new destination, nothing gets through, and the relay keeps serving.

B's punch datagrams parse as no QUIC packet and A's endpoint drops them unread; they are
sent only to the candidates of a peer that authenticated over the relayed connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from p2pfs.address import PeerAddress
from p2pfs.errors import CONNECTION_FAILURES
from p2pfs.ids import NodeId
from p2pfs.net import Endpoint, PeerConnection, Stream
from p2pfs.net.control import (
    MAX_CANDIDATES,
    Candidates,
    ControlError,
    ControlKind,
    ControlMessage,
    Decoder,
    encode,
    punchable,
)

from .relay import read_first_untrusted

logger = logging.getLogger(__name__)

PUNCH_SCHEDULE = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
"""When B sends its punch datagrams (seconds after A's CANDIDATES arrive): one before its
answer, more while A's Initials may still be on their way or retransmitted."""
DIRECT_TIMEOUT = 3.0
"""How long A's direct handshakes may take before the punch counts as failed."""
PUNCH_TTL = 2
"""Hops the first punch datagrams live: enough to cross our own home router (hop 1) and
die at the next, short of the far NAT, which they must not reach before the peer's own
first packet has left through it (see Endpoint.send_punch). Behind a second NAT (the
carrier's) they die inside it and open nothing there: the later ones go the whole way."""
WHOLE_WAY_AFTER = 0.2
"""The earliest a punch goes the whole way (the system's hop limit), in seconds from the
first; later still on a slow relayed path (``whole_way_after``)."""
RELAYED_RTTS_BEFORE_WHOLE_WAY = 1.5
"""The peer dials once our answer reaches it over the relay (half a relayed round trip);
a punch sent this many relayed round trips after the answer finds its first packet gone
out, so it arrives at the peer's NAT as an answer to it."""


PUNCHED_WINDOW = 10.0
"""B calls a direct connection from A "punched" if it arrives within this of the punch."""

PUNCH_OUTCOMES_KEPT = 64
"""Outcomes of recent punches a node keeps for ``p2pfs connect`` to report."""


def whole_way_after(relayed_rtt: float | None) -> float:
    """From when on (seconds after the first punch) punches go the whole way."""
    return max(WHOLE_WAY_AFTER, RELAYED_RTTS_BEFORE_WHOLE_WAY * (relayed_rtt or 0.0))


OwnCandidates = Callable[[], list[PeerAddress]]


@dataclass(slots=True)
class PunchOutcome:
    """One punch beside a relayed connection, as the dialling side saw it."""

    started: float = field(default_factory=trio.current_time)
    done: trio.Event = field(default_factory=trio.Event)
    direct: PeerConnection | None = None
    """The punched connection; None while running, or if nothing got through."""
    seconds: float | None = None
    """From the punch's start to the direct connection's authentication."""


class Puncher:
    def __init__(self, endpoint: Endpoint, own: OwnCandidates) -> None:
        self._endpoint = endpoint
        self._own = own
        self._punched_toward: dict[NodeId, float] = {}
        self.attempts = 0
        self.successes = 0

    def _candidates(self) -> Candidates:
        speaks = self._endpoint.speaks
        found = [(a.host, a.port) for a in self._own() if punchable(a.host) and speaks(a.host)]
        return Candidates(tuple(dict.fromkeys(found))[:MAX_CANDIDATES])

    async def initiate(self, relayed: PeerConnection) -> PeerConnection | None:
        """A's side: a direct connection to ``relayed``'s peer, or None if none got through."""
        peer = relayed.peer_id
        self.attempts += 1
        stream = await relayed.open_control(ControlKind.PUNCH, encode(self._candidates()))
        answer = await read_first_untrusted(stream, Decoder())
        await stream.send_eof()
        if not isinstance(answer, Candidates):
            raise ControlError(f"answered CANDIDATES with {type(answer).__name__}")
        speaks = self._endpoint.speaks
        targets = [a for a in answer.addresses if punchable(a[0]) and speaks(a[0])]
        logger.debug("punch: dialling %s directly at %s", peer.short(), targets)
        won: list[PeerConnection] = []
        async with trio.open_nursery() as nursery:
            for address in targets:
                nursery.start_soon(self._dial, address, peer, won, nursery.cancel_scope)
        if not won:
            logger.info("punch to %s failed: staying relayed", peer.short())
            return None
        direct = won[0]
        direct.path = "punched"
        self.successes += 1
        logger.info("punched a direct path to %s at %s", peer.short(), direct.remote_address)
        return direct

    async def _dial(
        self,
        address: tuple[str, int],
        peer: NodeId,
        won: list[PeerConnection],
        race: trio.CancelScope,
    ) -> None:
        try:
            with trio.fail_after(DIRECT_TIMEOUT):
                conn = await self._endpoint.connect(address, peer)
        except (trio.TooSlowError, *CONNECTION_FAILURES, OSError) as exc:
            # RemoteProtocolError among them: AuthenticationError, or a peer that does not
            # speak p2pfs/1 (it ended the daemon through the punch's nursery).
            logger.debug("punch: %s:%s failed: %s", address[0], address[1], exc)
            return
        if won:
            conn.close_nowait(0, "another path answered first")
            return
        won.append(conn)
        race.cancel()

    async def respond(
        self, relayed: PeerConnection, stream: Stream, first: ControlMessage, decoder: Decoder
    ) -> None:
        """B's side: answer with our candidates, then punch toward A's."""
        if not isinstance(first, Candidates) or relayed.path != "relayed":
            raise ControlError("a punch stream must start with CANDIDATES on a relayed path")
        targets = [a for a in first.addresses if punchable(a[0])]
        peer = relayed.peer_id
        started = trio.current_time()
        self._punched_toward[peer] = started + PUNCHED_WINDOW
        # The first punch leaves before our answer can: A dials only once it has the
        # answer, so its Initial never reaches our router ahead of the mapping. Were it
        # to, a Linux router would track that Initial as a flow to itself, and our punch
        # would then be mapped to another port (the tuple is taken), for as long as A's
        # retransmissions keep that entry alive: every punch for the next 30 s would fail.
        self._endpoint.send_punch(targets, PUNCH_TTL)
        await stream.send_all(encode(self._candidates()))
        await stream.send_eof()
        whole_way_from = whole_way_after(relayed.smoothed_rtt)
        for offset in PUNCH_SCHEDULE[1:]:
            await trio.sleep_until(started + offset)
            self._endpoint.send_punch(targets, None if offset >= whole_way_from else PUNCH_TTL)

    def mark(self, conn: PeerConnection) -> None:
        """B's side: a direct connection from a peer we just punched toward is punched."""
        if conn.path != "direct":
            return
        until = self._punched_toward.get(conn.peer_id)
        if until is not None and trio.current_time() <= until:
            conn.path = "punched"
            self.successes += 1
