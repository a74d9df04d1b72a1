"""Private DHT benchmark (issues 4, 14): ``python -m benchmarks dht [--in-process]``.

Default: ``--nodes`` (30) real daemons in their own processes on 127.0.0.1, started with
``--no-lan`` and ``P2PFS_DHT_K=--ksize`` (4), each bootstrapped from the previous one's DHT
port (a chain). ``--sharers`` (3) of them share a small folder of their own with
``--no-hints``; then ``--lookups`` ``find`` calls go one after another through the control
API of random daemons (never the share's own sharer).

Why k=4: with the DHT's default k=20 in a 20-node DHT an announce leaves the record on every
node and every lookup is answered from the asker's own records (a dictionary lookup, not a
DHT lookup). At k=4 a record lives on 4 of 30 nodes, as it would on a few of many thousands,
so most lookups must cross the network.

Reported, from the daemons' own counters (``id``: discovery.dht): each lookup's hops (the
asker's crawl rounds, read around the call; 0 = answered from its own records), the DHT
datagrams and bytes all daemons sent per lookup, and how many records the announces left
(k per share). Times: inside the daemon (``find``'s ``seconds``), for network lookups apart,
and the client's round trip (control socket included), p50 and p95; success (the sharer's
NodeId among the providers); an ``id`` call's round trip as the control socket's own cost.

``--in-process``: ``--nodes`` DhtFinders on 127.0.0.1, each with its own thread and asyncio
loop as in the daemon, bootstrapped in a chain, with the same ``--ksize``. ``--keys`` keys are
announced by random nodes, then ``--lookups`` provider lookups run one after another from
random nodes (never the key's provider). Bytes and datagrams per lookup are summed over all
nodes. The reference is one ping round trip through the same facade and thread boundary,
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from p2pfs.address import PeerAddress
from p2pfs.daemon.discovery import DHT_K_ENV
from p2pfs.discovery.dht.finder import DhtFinder
from tests.support.daemons import DaemonProcess


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
        "mode": "in-process",
        "seed": args.seed,
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


def _dht_address(daemon: DaemonProcess) -> str:
    return f"127.0.0.1:{daemon.call('id')['discovery']['dht_port']}"


def _dht(daemon: DaemonProcess) -> dict[str, Any]:
    """The daemon's private-DHT counters (``id``: discovery.dht)."""
    info: dict[str, Any] = daemon.call("id")["discovery"]["dht"]
    return info


def _traffic(daemons: list[DaemonProcess]) -> tuple[int, int]:
    """Datagrams and bytes sent by all daemons' DHT sockets so far."""
    sent = sent_bytes = 0
    for daemon in daemons:
        traffic = _dht(daemon)["traffic"]
        sent += int(traffic["sent"])
        sent_bytes += int(traffic["sent_bytes"])
    return sent, sent_bytes


def _small_folder(path: Path, rng: random.Random) -> Path:
    path.mkdir(parents=True)
    for number in range(3):
        (path / f"file{number}.bin").write_bytes(rng.randbytes(16 << 10))
    return path


@dataclass(frozen=True, slots=True)
class _Found:
    inside: float
    """The lookup's time inside the daemon (``find``'s ``seconds``)."""
    round_trip: float
    """The same seen by the client, control socket included."""
    hops: int
    """Crawl rounds of the asker's DHT lookup (0: answered from its own records)."""
    success: bool


def _find(asker: DaemonProcess, ticket: str, sharer_id: str) -> _Found:
    before = _dht(asker)["lookups"]
    began = time.perf_counter()
    reply = asker.call("find", {"ticket": ticket})
    round_trip = time.perf_counter() - began
    after = _dht(asker)["lookups"]
    return _Found(
        inside=float(reply["seconds"]),
        round_trip=round_trip,
        hops=int(after["rounds"]) - int(before["rounds"]),
        success=any(p.get("node_id") == sharer_id for p in reply["providers"]),
    )


def _start_daemons(args: argparse.Namespace, workdir: Path, daemons: list[DaemonProcess]) -> None:
    """A chain of daemons at k=``--ksize``, appended to ``daemons`` as they start."""
    for index in range(args.nodes):
        extra = ["--no-lan"]
        if daemons:
            extra += ["--bootstrap", _dht_address(daemons[-1])]
        daemon = DaemonProcess(
            workdir / f"node{index}",
            extra_args=tuple(extra),
            env={DHT_K_ENV: str(args.ksize)},
        )
        daemons.append(daemon)
        daemon.start()


def _measure_daemons(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    daemons: list[DaemonProcess] = []
    try:
        started = time.perf_counter()
        _start_daemons(args, workdir, daemons)
        start_seconds = time.perf_counter() - started

        sharers = rng.sample(daemons, min(args.sharers, len(daemons)))
        tickets: dict[str, tuple[DaemonProcess, str]] = {}
        for number, sharer in enumerate(sharers):
            folder = _small_folder(workdir / f"share{number}", rng)
            ticket = str(sharer.cli_json("share", str(folder), "--no-hints")["ticket"])
            tickets[ticket] = (sharer, sharer.node_id())
        holders = [_dht(d)["records"] for d in daemons]

        controls = []
        for _ in range(args.lookups):
            daemon = rng.choice(daemons)
            began = time.perf_counter()
            daemon.call("id")
            controls.append(time.perf_counter() - began)

        traffic_before = _traffic(daemons)
        found: list[_Found] = []
        for _ in range(args.lookups):
            ticket = rng.choice(list(tickets))
            sharer, sharer_id = tickets[ticket]
            asker = rng.choice([d for d in daemons if d is not sharer])
            found.append(_find(asker, ticket, sharer_id))
        traffic_after = _traffic(daemons)
    finally:
        for daemon in daemons:
            daemon.stop()
    inside = [f.inside for f in found]
    remote = [f for f in found if f.hops > 0]
    return {
        "mode": "daemons",
        "seed": args.seed,
        "nodes": args.nodes,
        "ksize": args.ksize,
        "sharers": len(tickets),
        "records_held": sum(holders),
        "nodes_holding_records": sum(1 for held in holders if held),
        "lookups": args.lookups,
        "start_seconds": start_seconds,
        "success": sum(f.success for f in found) / args.lookups,
        "find_p50_ms": _percentile(inside, 0.5) * 1000,
        "find_p95_ms": _percentile(inside, 0.95) * 1000,
        "round_trip_p50_ms": _percentile([f.round_trip for f in found], 0.5) * 1000,
        "round_trip_p95_ms": _percentile([f.round_trip for f in found], 0.95) * 1000,
        "control_p50_ms": _percentile(controls, 0.5) * 1000,
        "control_p95_ms": _percentile(controls, 0.95) * 1000,
        "remote_lookups": len(remote),
        "remote_p50_ms": _percentile([f.inside for f in remote], 0.5) * 1000
        if remote
        else float("nan"),
        "remote_p95_ms": _percentile([f.inside for f in remote], 0.95) * 1000
        if remote
        else float("nan"),
        "hops_median": statistics.median(f.hops for f in remote) if remote else 0,
        "hops_max": max((f.hops for f in remote), default=0),
        "hops_histogram": dict(sorted(Counter(f.hops for f in found).items())),
        "datagrams_per_lookup": (traffic_after[0] - traffic_before[0]) / args.lookups,
        "bytes_per_lookup": (traffic_after[1] - traffic_before[1]) / args.lookups,
    }


def daemon_rows_for(figures: dict[str, Any]) -> list[Row]:
    control = f"{figures['control_p50_ms']:.2f} ms (id call RTT)"
    remote = figures["remote_lookups"]
    local = figures["lookups"] - remote
    return [
        Row(
            "lookups over the network (>= 1 hop) / from the asker's own records",
            f"{remote} / {local}",
            "",
            "",
            None,
        ),
        Row(
            "hops of network lookups: median / max",
            f"{figures['hops_median']:g} / {figures['hops_max']}" if remote else "none",
            "",
            "",
            None,
        ),
        Row(
            "network lookups p50 / p95 inside the daemon",
            f"{figures['remote_p50_ms']:.2f} / {figures['remote_p95_ms']:.2f} ms"
            if remote
            else "none",
            "",
            "<= 50 ms" if remote else "",
            figures["remote_p50_ms"] <= 50 if remote else None,
        ),
        Row(
            "all lookups p50 / p95 inside the daemon",
            f"{figures['find_p50_ms']:.2f} / {figures['find_p95_ms']:.2f} ms",
            "",
            "",
            None,
        ),
        Row(
            "all lookups p50 / p95 round trip (control socket included)",
            f"{figures['round_trip_p50_ms']:.2f} / {figures['round_trip_p95_ms']:.2f} ms",
            control,
            "",
            None,
        ),
        Row(
            "success rate",
            f"{figures['success']:.2%}",
            "",
            "100%",
            figures["success"] == 1.0,
        ),
        Row(
            "DHT datagrams / bytes per lookup (sent, all daemons)",
            f"{figures['datagrams_per_lookup']:.1f} / {figures['bytes_per_lookup']:,.0f} B",
            "",
            "",
            None,
        ),
        Row(
            "records held (nodes holding any)",
            f"{figures['records_held']} ({figures['nodes_holding_records']} nodes)",
            f"k x shares = {figures['ksize'] * figures['sharers']}",
            "",
            None,
        ),
        Row("daemons started (chain) in", f"{figures['start_seconds']:.1f} s", "", "", None),
    ]


def print_table(rows: list[Row], figures: dict[str, Any]) -> None:
    if figures.get("mode") == "daemons":
        title = (
            f"p2pfs private DHT benchmark: {figures['nodes']} loopback daemons, "
            f"k={figures['ksize']}, {figures['sharers']} --no-hints shares, "
            f"{figures['lookups']} lookups, seed {figures['seed']}"
        )
    else:
        title = (
            f"p2pfs private DHT benchmark: {figures['nodes']} loopback nodes in one process, "
            f"k={figures['ksize']}, {figures['lookups']} lookups, seed {figures['seed']}"
        )
    table = Table(title=title)
    for column in ("measure", "p2pfs", "reference (same run)", "goal", "met"):
        table.add_column(column)
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        table.add_row(row.measure, row.p2pfs, row.reference, row.goal, met)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks dht")
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="DhtFinders in this process instead of real daemons",
    )
    parser.add_argument(
        "--sharers", type=int, default=3, help="daemons sharing a folder (default 3)"
    )
    parser.add_argument(
        "--ksize",
        type=int,
        default=4,
        help="k of the DHT (default 4: a record lives on 4 of the nodes, as on a few of many)",
    )
    parser.add_argument("--keys", type=int, default=20, help="--in-process only")
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument(
        "--workdir",
        type=Path,
        help="daemon homes and shared folders go here (default: a temporary directory)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    if args.in_process:
        figures = trio.run(_measure, args)
        rows = rows_for(figures)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="p2pfs-bench-dht-", dir=args.workdir))
        try:
            figures = _measure_daemons(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        rows = daemon_rows_for(figures)
    if args.json:
        print(json.dumps({"rows": [asdict(row) for row in rows], "figures": figures}))
    else:
        print_table(rows, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
