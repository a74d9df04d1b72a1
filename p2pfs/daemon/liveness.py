"""Telling a dead peer from a quiet one, sooner than the transport's idle timeout.

A peer that crashes, restarts, loses its relay or its NAT mapping sends no
CONNECTION_CLOSE: its connection just goes silent until the 30 s idle timeout, and every
request on it waits for its own stall timeout. A peer that is only slow (a throttled
transfer, a busy disk) still acknowledges a PING at once, since QUIC acknowledges in the
transport, below the application. So silence is tested with a PING, and a connection that
leaves it unanswered is closed: every user's pending operation fails at once and the
peer is dialled again (another address, another relay).
"""

from __future__ import annotations

import logging

import trio

from p2pfs.net import CloseCode, PeerConnection

logger = logging.getLogger(__name__)

TRANSFER_QUIET_AFTER = 2.0
"""A transfer's connection that has delivered nothing for this long is probed."""
ANSWER_WITHIN = 2.0
"""Many round trips at any RTT a peer link should keep; the engine resends the PING on its
own probe timer meanwhile, so one lost packet is not a verdict."""


async def close_when_silent(
    conn: PeerConnection, quiet_after: float, answer_within: float = ANSWER_WITHIN
) -> None:
    """Run beside the work on ``conn``: after ``quiet_after`` s with nothing received,
    PING; unanswered within ``answer_within`` s, close ``conn`` and return. A quiet
    connection is pinged every ``quiet_after`` s, which also keeps it under the idle
    timeout."""
    seen = conn.bytes_received
    while not conn.is_closed:
        await trio.sleep(quiet_after)
        if conn.bytes_received != seen:
            seen = conn.bytes_received
            continue
        if not await conn.responsive(answer_within):
            if not conn.is_closed:
                logger.info(
                    "%r: no answer to a PING in %g s after %g s of silence: closing it",
                    conn,
                    answer_within,
                    quiet_after,
                )
                # Its answers may be riding in datagrams the path drops (endpoint).
                conn.stalled()
                conn.close_nowait(CloseCode.NO_ERROR, "peer stopped answering")
            return
        seen = conn.bytes_received
