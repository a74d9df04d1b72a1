"""Private DHT benchmark (issue 4): ``python -m p2pfs.bench dht``.

``--nodes`` DhtFinders (20) on 127.0.0.1, each with its own thread and asyncio loop as in the
daemon, bootstrapped in a chain. ``--keys`` keys are announced by random nodes, then
``--lookups`` provider lookups run one after another from random nodes (never the key's
provider). With the default k=20 every node of a 20-node DHT would hold every record and
answer from memory, so the bench uses Mainline's k=8 (``--ksize``): most lookups then cross
the network. Bytes and datagrams per lookup are summed over all nodes. The reference is one
ping round trip through the same facade and thread boundary, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from p2pfs.discovery.dht.finder import DhtFinder
from p2pfs.wire.ticket import PeerAddress


@dataclass(frozen=True, slots=True)
class Row:
    measure: str
    p2pfs: str
    reference: str
    goal: str
    met: bool | None


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def _totals(finders: list[DhtFinder]) -> tuple[int, int]:
    return (
        sum(f.traffic.sent for f in finders),
        sum(f.traffic.sent_bytes for f in finders),
    )


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    finders: list[DhtFinder] = []
    async with trio.open_nursery() as nursery:
        for index in range(args.nodes):
            finder = DhtFinder(
                node_id=rng.randbytes(32),
                quic_port=20_000 + index,
                host="127.0.0.1",
                bootstrap=[PeerAddress("127.0.0.1", finders[-1].port)] if finders else [],
                ksize=args.ksize,
            )
            await nursery.start(finder.serve)
            finders.append(finder)

        pings = []
        for _ in range(args.lookups):
            a, b = rng.sample(finders, 2)
            started = time.perf_counter()
            await a.ping(PeerAddress("127.0.0.1", b.port))
            pings.append(time.perf_counter() - started)

        providers: dict[bytes, DhtFinder] = {}
        announces = []
        for _ in range(args.keys):
            key, provider = rng.randbytes(32), rng.choice(finders)
            started = time.perf_counter()
            await provider.announce(key)
            announces.append(time.perf_counter() - started)
            providers[key] = provider

        latencies, remote, rounds = [], [], []
        found = messages = volume = 0
        for _ in range(args.lookups):
            key = rng.choice(list(providers))
            seeker = rng.choice([f for f in finders if f is not providers[key]])
            before = _totals(finders)
            started = time.perf_counter()
            lookup = await seeker.lookup(key)
            elapsed = time.perf_counter() - started
            after = _totals(finders)
            messages += after[0] - before[0]
            volume += after[1] - before[1]
            latencies.append(elapsed)
            rounds.append(lookup.rounds)
            if lookup.rounds:
                remote.append(elapsed)
            if any(p.node_id == providers[key].node_id for p in lookup.providers):
                found += 1
        nursery.cancel_scope.cancel()
    return {
        "nodes": args.nodes,
        "ksize": args.ksize,
        "lookups": args.lookups,
        "success": found / args.lookups,
        "lookup_p50_ms": _percentile(latencies, 0.5) * 1000,
        "lookup_p95_ms": _percentile(latencies, 0.95) * 1000,
        "remote_lookups": len(remote),
        "remote_p50_ms": _percentile(remote, 0.5) * 1000 if remote else float("nan"),
        "remote_p95_ms": _percentile(remote, 0.95) * 1000 if remote else float("nan"),
        "rounds_median": statistics.median(rounds),
        "ping_p50_ms": _percentile(pings, 0.5) * 1000,
        "ping_p95_ms": _percentile(pings, 0.95) * 1000,
        "announce_p50_ms": _percentile(announces, 0.5) * 1000,
        "datagrams_per_lookup": messages / args.lookups,
        "bytes_per_lookup": volume / args.lookups,
    }


def rows_for(figures: dict[str, Any]) -> list[Row]:
    ping = f"{figures['ping_p50_ms']:.2f} ms (one ping RTT)"
    return [
        Row(
            "lookup latency p50 (all)",
            f"{figures['lookup_p50_ms']:.2f} ms",
            ping,
            "<= 50 ms",
            figures["lookup_p50_ms"] <= 50,
        ),
        Row(
            "lookup latency p95 (all)",
            f"{figures['lookup_p95_ms']:.2f} ms",
            f"{figures['ping_p95_ms']:.2f} ms (ping p95)",
            "",
            None,
        ),
        Row(
            f"lookup p50 / p95 over the network ({figures['remote_lookups']} lookups)",
            f"{figures['remote_p50_ms']:.2f} / {figures['remote_p95_ms']:.2f} ms",
            ping,
            "<= 50 ms",
            figures["remote_p50_ms"] <= 50,
        ),
        Row("crawl rounds (median)", f"{figures['rounds_median']:g}", "", "", None),
        Row(
            "success rate",
            f"{figures['success']:.2%}",
            "",
            "100%",
            figures["success"] == 1.0,
        ),
        Row("DHT bytes per lookup", f"{figures['bytes_per_lookup']:,.0f} B", "", "", None),
        Row("DHT datagrams per lookup", f"{figures['datagrams_per_lookup']:.1f}", "", "", None),
        Row("announce latency p50", f"{figures['announce_p50_ms']:.2f} ms", "", "", None),
    ]


def print_table(rows: list[Row], figures: dict[str, Any]) -> None:
    table = Table(
        title=f"p2pfs private DHT benchmark: {figures['nodes']} loopback nodes, "
        f"k={figures['ksize']}, {figures['lookups']} lookups"
    )
    for column in ("measure", "p2pfs", "reference (same run)", "goal", "met"):
        table.add_column(column)
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        table.add_row(row.measure, row.p2pfs, row.reference, row.goal, met)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pfs.bench dht")
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--ksize", type=int, default=8, help="k of the DHT (default 8)")
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    figures = trio.run(_measure, args)
    rows = rows_for(figures)
    if args.json:
        print(json.dumps({"rows": [asdict(row) for row in rows], "figures": figures}))
    else:
        print_table(rows, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
