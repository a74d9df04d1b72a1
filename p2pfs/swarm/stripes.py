"""How many connections ("stripes") a fetch runs to one peer.

One QUIC connection's congestion control (qh3's CUBIC, loss-based and not configurable)
holds its window to about 1.22 MSS / sqrt(p) under random loss p, whatever the link's
capacity, so on a long lossy path one connection moves a small part of the link (measured
through the link emulator: 0.26 MB/s of 12.5 at 80 ms and 1% loss, 3.3 MB/s at 20 ms and
0.1%). Each extra connection has a window of its own, so the rate grows with their number
until the link is full (the remedy of GridFTP, aria2's connections per server and
BitTorrent's many peers). On a short path (a LAN, loopback) the rate is bound by CPU, not by
a window, and an extra connection only costs a handshake and per-connection work: one.

So: stripes only where the round trip is long, only for a direct path (a relay carries
every stripe's bytes), and only while enough is left to repay a handshake. The stripes a
fetch opens are shared out over its peers: several peers already give several windows.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfs.errors import LocalProtocolError

MiB = 1 << 20

DEFAULT_MAX_STRIPES = 4
"""Connections to one peer at most (``p2pfs daemon --stripes``)."""
STRIPE_MIN_RTT = 0.010
"""Below this a path is short (a LAN: ~0.1-2 ms), and its rate is not a window's."""
MIN_BYTES_PER_STRIPE = 1 * MiB
"""A stripe must have at least this much to carry: its handshake costs a round trip and a
key exchange (a few KB), and its window starts small (10 packets)."""


@dataclass(frozen=True, slots=True)
class StripePlan:
    """What ``stripes_for`` decided for one peer, and why (shown in the fetch's peers)."""

    stripes: int
    reason: str


def stripes_for(
    rtt: float | None,
    *,
    relayed: bool,
    max_stripes: int,
    peers: int,
    remaining_bytes: int,
) -> StripePlan:
    """The connections to fetch from one peer over (the one already open included).

    ``rtt``: the connection's smoothed round trip (s), None if the engine has no sample;
    ``peers``: the peers the fetch is connected to now, this one included."""
    if max_stripes < 1 or peers < 1 or remaining_bytes < 0:
        raise LocalProtocolError("max_stripes and peers must be >= 1, remaining_bytes >= 0")
    if max_stripes == 1:
        return StripePlan(1, "stripes off")
    if relayed:
        return StripePlan(1, "relayed path")
    if rtt is None:
        return StripePlan(1, "round trip unknown")
    if rtt < STRIPE_MIN_RTT:
        return StripePlan(1, f"short path ({rtt * 1000:.1f} ms)")
    # The fetch aims at max_stripes windows in all: more peers, fewer stripes each.
    share = -(-max_stripes // peers)
    by_size = remaining_bytes // MIN_BYTES_PER_STRIPE
    stripes = max(1, min(share, by_size))
    if stripes == 1:
        why = "little left to fetch" if by_size < share else "enough peers"
        return StripePlan(1, why)
    return StripePlan(stripes, f"long path ({rtt * 1000:.0f} ms)")
