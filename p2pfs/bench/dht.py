"""Private DHT benchmark (issue 4): ``python -m p2pfs.bench dht [--in-process]``.

Default, as the issue words it: ``--nodes`` (20) real daemons in their own processes on
127.0.0.1, started with ``--no-lan`` and each bootstrapped from the previous one's DHT port (a
chain). ``--sharers`` (3) of them share a small folder of their own with ``--no-hints``; then
``--lookups`` ``find`` calls go one after another through the control API of random daemons
(never the share's own sharer). Reported: the lookup time measured inside the daemon (the
``seconds`` of ``find``) and the round trip seen by the client (control socket included), p50
and p95; success (the sharer's NodeId among the providers); the round trip of an ``id`` call
as the control socket's own cost. The daemons run the DHT's default k=20, so in a 20-node DHT
an announce leaves the record on (nearly) every node and most lookups are answered from the
asking node's own records (under 1 ms); those of 1 ms or more, most of them crawls over
the network, are reported apart. ``--nodes 60`` makes most lookups cross the network. DHT
bytes per lookup are read from the daemons' ``id`` (``discovery.traffic.sent_bytes``) when
they report it, and are otherwise "not measured" here (the in-process mode measures them).

``--in-process``: ``--nodes`` DhtFinders (20) on 127.0.0.1, each with its own thread and
asyncio loop as in the daemon, bootstrapped in a chain. ``--keys`` keys are announced by
random nodes, then ``--lookups`` provider lookups run one after another from random nodes
(never the key's provider). With the default k=20 every node of a 20-node DHT would hold
every record and answer from memory, so this mode uses Mainline's k=8 (``--ksize``): most
lookups then cross the network. Bytes and datagrams per lookup are summed over all nodes.
The reference is one ping round trip through the same facade and thread boundary, measured
in the same run.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from p2pfs.bench.daemons import DaemonProcess
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
        "mode": "in-process",
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


LOCAL_ANSWER = 0.001
"""In-daemon lookups faster than this (1 ms) crossed no network: answered from own records."""


def _dht_address(daemon: DaemonProcess) -> str:
    return f"127.0.0.1:{daemon.call('id')['discovery']['dht_port']}"


def _dht_sent_bytes(daemons: list[DaemonProcess]) -> int | None:
    """Bytes sent by all daemons' DHT sockets, if the daemons report them (else None)."""
    total = 0
    for daemon in daemons:
        traffic = daemon.call("id")["discovery"].get("traffic")
        if not isinstance(traffic, dict) or not isinstance(traffic.get("sent_bytes"), int):
            return None
        total += traffic["sent_bytes"]
    return total


def _small_folder(path: Path, rng: random.Random) -> Path:
    path.mkdir(parents=True)
    for number in range(3):
        (path / f"file{number}.bin").write_bytes(rng.randbytes(16 << 10))
    return path


def _measure_daemons(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    daemons: list[DaemonProcess] = []
    try:
        started = time.perf_counter()
        for index in range(args.nodes):
            extra = ["--no-lan"]
            if daemons:
                extra += ["--bootstrap", _dht_address(daemons[-1])]
            daemon = DaemonProcess(workdir / f"node{index}", extra_args=tuple(extra))
            daemons.append(daemon)
            daemon.start()
        start_seconds = time.perf_counter() - started

        sharers = rng.sample(daemons, min(args.sharers, len(daemons)))
        tickets: dict[str, tuple[DaemonProcess, str]] = {}
        for number, sharer in enumerate(sharers):
            folder = _small_folder(workdir / f"share{number}", rng)
            ticket = str(sharer.cli_json("share", str(folder), "--no-hints")["ticket"])
            tickets[ticket] = (sharer, sharer.node_id())

        controls = []
        for _ in range(args.lookups):
            daemon = rng.choice(daemons)
            began = time.perf_counter()
            daemon.call("id")
            controls.append(time.perf_counter() - began)

        bytes_before = _dht_sent_bytes(daemons)
        inside: list[float] = []
        round_trips: list[float] = []
        found = 0
        for _ in range(args.lookups):
            ticket = rng.choice(list(tickets))
            sharer, sharer_id = tickets[ticket]
            asker = rng.choice([d for d in daemons if d is not sharer])
            began = time.perf_counter()
            reply = asker.call("find", {"ticket": ticket})
            round_trips.append(time.perf_counter() - began)
            inside.append(float(reply["seconds"]))
            if any(p.get("node_id") == sharer_id for p in reply["providers"]):
                found += 1
        bytes_after = _dht_sent_bytes(daemons)
    finally:
        for daemon in daemons:
            daemon.stop()
    remote = [seconds for seconds in inside if seconds >= LOCAL_ANSWER]
    return {
        "mode": "daemons",
        "nodes": args.nodes,
        "sharers": len(tickets),
        "lookups": args.lookups,
        "start_seconds": start_seconds,
        "success": found / args.lookups,
        "find_p50_ms": _percentile(inside, 0.5) * 1000,
        "find_p95_ms": _percentile(inside, 0.95) * 1000,
        "round_trip_p50_ms": _percentile(round_trips, 0.5) * 1000,
        "round_trip_p95_ms": _percentile(round_trips, 0.95) * 1000,
        "control_p50_ms": _percentile(controls, 0.5) * 1000,
        "control_p95_ms": _percentile(controls, 0.95) * 1000,
        "remote_lookups": len(remote),
        "remote_p50_ms": _percentile(remote, 0.5) * 1000 if remote else float("nan"),
        "remote_p95_ms": _percentile(remote, 0.95) * 1000 if remote else float("nan"),
        "bytes_per_lookup": (
            None
            if bytes_before is None or bytes_after is None
            else (bytes_after - bytes_before) / args.lookups
        ),
    }


def daemon_rows_for(figures: dict[str, Any]) -> list[Row]:
    control = f"{figures['control_p50_ms']:.2f} ms (id call RTT)"
    remote = figures["remote_lookups"]
    volume = figures["bytes_per_lookup"]
    return [
        Row(
            "lookup p50 inside the daemon",
            f"{figures['find_p50_ms']:.2f} ms",
            "",
            "<= 50 ms",
            figures["find_p50_ms"] <= 50,
        ),
        Row("lookup p95 inside the daemon", f"{figures['find_p95_ms']:.2f} ms", "", "", None),
        Row(
            "lookup p50 / p95 round trip (control socket included)",
            f"{figures['round_trip_p50_ms']:.2f} / {figures['round_trip_p95_ms']:.2f} ms",
            control,
            "<= 50 ms",
            figures["round_trip_p50_ms"] <= 50,
        ),
        Row(
            f"lookups >= 1 ms inside the daemon ({remote}), p50 / p95",
            f"{figures['remote_p50_ms']:.2f} / {figures['remote_p95_ms']:.2f} ms"
            if remote
            else "none",
            "",
            "<= 50 ms" if remote else "",
            figures["remote_p50_ms"] <= 50 if remote else None,
        ),
        Row(
            "success rate",
            f"{figures['success']:.2%}",
            "",
            "100%",
            figures["success"] == 1.0,
        ),
        Row(
            "DHT bytes per lookup",
            "not measured (daemons do not report DHT traffic)"
            if volume is None
            else f"{volume:,.0f} B",
            "",
            "",
            None,
        ),
        Row("daemons started (chain) in", f"{figures['start_seconds']:.1f} s", "", "", None),
    ]


def print_table(rows: list[Row], figures: dict[str, Any]) -> None:
    if figures.get("mode") == "daemons":
        title = (
            f"p2pfs private DHT benchmark: {figures['nodes']} loopback daemons, "
            f"{figures['sharers']} --no-hints shares, {figures['lookups']} lookups"
        )
    else:
        title = (
            f"p2pfs private DHT benchmark: {figures['nodes']} loopback nodes in one process, "
            f"k={figures['ksize']}, {figures['lookups']} lookups"
        )
    table = Table(title=title)
    for column in ("measure", "p2pfs", "reference (same run)", "goal", "met"):
        table.add_column(column)
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        table.add_row(row.measure, row.p2pfs, row.reference, row.goal, met)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pfs.bench dht")
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="DhtFinders in this process instead of real daemons",
    )
    parser.add_argument(
        "--sharers", type=int, default=3, help="daemons sharing a folder (default 3)"
    )
    parser.add_argument(
        "--ksize", type=int, default=8, help="k of the DHT, --in-process only (default 8)"
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
