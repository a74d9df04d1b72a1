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
"""The least time a peer is given to answer: many round trips on most paths."""
RTTS_TO_ANSWER = 8
"""On a long path the peer is given this many smoothed round trips instead. At a 600 ms
round trip with 3% loss each way, one PING and its answer are lost 6% of the time, and
the engine resent a lost PING only after ~1.8 s: 2 s closed a folder link that was alive
at both ends (the link emulator's folder join: 2 of 2 runs; SPEC, Swarming)."""
LONGEST_ANSWER = 8.0
"""The most a peer is given (a round trip of a second or more): our own pauses inflate the
engine's estimate (the peer's packets wait unread while we are not reading; the RTT
samples then include the wait, 1-3 s measured), and the idle timeout is 30 s."""
PINGS_TO_ANSWER = 4
"""PINGs sent across the answer time, one per quarter: a peer is silent only if all four,
or their answers, are lost (~1e-5 at 6% each) or nobody is there."""


async def close_when_silent(
    conn: PeerConnection, quiet_after: float, answer_within: float = ANSWER_WITHIN
) -> None:
    """Run beside the work on ``conn``: after ``quiet_after`` s with nothing received,
    PING; unanswered (``answered``), close ``conn`` and return. A quiet connection is
    pinged every ``quiet_after`` s, which also keeps it under the idle timeout."""
    seen = conn.bytes_received
    while not conn.is_closed:
        await trio.sleep(quiet_after)
        if conn.bytes_received != seen:
            seen = conn.bytes_received
            continue
        if not await answered(conn, answer_within):
            if not conn.is_closed:
                logger.info(
                    "%r: no answer to %d PINGs in %.1f s after %g s of silence: closing it",
                    conn,
                    PINGS_TO_ANSWER,
                    answer_time(conn, answer_within),
                    quiet_after,
                )
                # Its answers may be riding in datagrams the path drops (endpoint).
                conn.stalled()
                conn.close_nowait(CloseCode.NO_ERROR, "peer stopped answering")
            return
        seen = conn.bytes_received


def answer_time(conn: PeerConnection, answer_within: float = ANSWER_WITHIN) -> float:
    """How long the peer is given: ``answer_within`` or RTTS_TO_ANSWER round trips, at
    most LONGEST_ANSWER."""
    rtts = min(LONGEST_ANSWER, RTTS_TO_ANSWER * (conn.smoothed_rtt or 0.0))
    return max(answer_within, rtts)


async def answered(conn: PeerConnection, answer_within: float = ANSWER_WITHIN) -> bool:
    """Whether the peer acknowledges one of PINGS_TO_ANSWER PINGs spread over
    ``answer_time``. Only an acknowledgement answers: datagrams held while we were not
    reading are counted as they are processed, long after the peer sent them."""
    each = answer_time(conn, answer_within) / PINGS_TO_ANSWER
    for _ in range(PINGS_TO_ANSWER):
        if await conn.responsive(each):
            return True
        if conn.is_closed:
            return False
    return False
