"""``/metrics``: the node's counters in Prometheus' text format.

The daemon fills a ``Snapshot`` when scraped (its counters are plain ints kept where things
happen; nothing is sampled between scrapes) and prometheus-client writes the exposition, so
its escaping and histogram rules are the library's, not ours.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class Histogram:
    """Counts of observations at or under each bound (not cumulative here), their sum."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count at or under it), ending with +Inf, as the exposition wants."""
        running = 0
        found = []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            found.append((bound, float(running)))
        return found


@dataclass(frozen=True, slots=True)
class PeerTraffic:
    node_id: str
    path: str
    bytes_sent: int
    bytes_received: int
    payload_sent: int = 0
    payload_received: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    bytes_by_kind: dict[tuple[str, str], int]
    """(direction, kind) -> bytes: kind is chunk payload or protocol."""
    peers: list[PeerTraffic]
    chunks: dict[str, int]
    """received, rejected, served, unreadable (a local file changed under its record)."""
    dht_lookups: int
    lookup_latency: Histogram
    folders_by_state: dict[str, int]
    event_subscribers: int
    events_emitted: int
    udp_buffers: dict[str, int] = field(default_factory=dict)
    """receive / send -> bytes the kernel granted the node's UDP socket."""
    udp_kernel_drops: int | None = None
    """Datagrams the kernel dropped at the socket (None: the platform does not say)."""


FOLDER_STATES = ("idle", "scanning", "syncing", "paused", "error")
PATH_TYPES = ("direct", "punched", "relayed")


def render(snapshot: Snapshot) -> bytes:
    from prometheus_client.core import (  # noqa: PLC0415 -- loaded at the first scrape only
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import generate_latest  # noqa: PLC0415
    from prometheus_client.registry import Collector, CollectorRegistry  # noqa: PLC0415

    def families() -> Iterable[Metric]:
        traffic = CounterMetricFamily(
            "p2pfs_bytes",
            "Bytes over peer connections by direction and kind",
            labels=["direction", "kind"],
        )
        for (direction, kind), value in sorted(snapshot.bytes_by_kind.items()):
            traffic.add_metric([direction, kind], value)
        yield traffic
        per_peer = CounterMetricFamily(
            "p2pfs_peer_bytes",
            "Bytes of each open connection by peer, direction, kind (udp: every datagram "
            "byte; payload: chunk data within them) and path type",
            labels=["peer", "direction", "kind", "path"],
        )
        for peer in snapshot.peers:
            for direction, udp, payload in (
                ("sent", peer.bytes_sent, peer.payload_sent),
                ("received", peer.bytes_received, peer.payload_received),
            ):
                per_peer.add_metric([peer.node_id, direction, "udp", peer.path], udp)
                per_peer.add_metric([peer.node_id, direction, "payload", peer.path], payload)
        yield per_peer
        chunks = CounterMetricFamily("p2pfs_chunks", "Chunks by outcome", labels=["outcome"])
        for outcome, value in sorted(snapshot.chunks.items()):
            chunks.add_metric([outcome], value)
        yield chunks
        yield CounterMetricFamily(
            "p2pfs_dht_lookups", "Private DHT provider lookups", value=snapshot.dht_lookups
        )
        yield HistogramMetricFamily(
            "p2pfs_discovery_lookup_seconds",
            "Time to find a share's or folder's providers over every discovery backend",
            buckets=snapshot.lookup_latency.cumulative(),
            sum_value=snapshot.lookup_latency.total,
        )
        folders = GaugeMetricFamily("p2pfs_folders", "Sync folders by state", labels=["state"])
        for state in FOLDER_STATES:
            folders.add_metric([state], snapshot.folders_by_state.get(state, 0))
        yield folders
        connections = GaugeMetricFamily(
            "p2pfs_connections", "Open peer connections by path type", labels=["path"]
        )
        for path in PATH_TYPES:
            connections.add_metric([path], sum(1 for p in snapshot.peers if p.path == path))
        yield connections
        yield GaugeMetricFamily(
            "p2pfs_event_subscribers", "Event streams open", value=snapshot.event_subscribers
        )
        yield CounterMetricFamily(
            "p2pfs_events", "Events emitted since start", value=snapshot.events_emitted
        )
        buffers = GaugeMetricFamily(
            "p2pfs_udp_buffer_bytes",
            "The UDP socket's kernel buffers as granted (below what was asked when capped)",
            labels=["direction"],
        )
        for direction, size in sorted(snapshot.udp_buffers.items()):
            buffers.add_metric([direction], size)
        yield buffers
        if snapshot.udp_kernel_drops is not None:
            yield CounterMetricFamily(
                "p2pfs_udp_kernel_drops",
                "Datagrams the kernel dropped before the daemon read them (a full buffer)",
                value=snapshot.udp_kernel_drops,
            )

    class _Once(Collector):
        def collect(self) -> Iterable[Metric]:
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Once())
    return generate_latest(registry)
