"""``python -m benchmarks nat``: fetches across the namespace bed's NATs, by path.

One bed (tests/support/netbed.py; needs root, ``ip`` and ``nft``; the port-mapped row also
``miniupnpd``), real daemons at their defaults plus the flags each path needs:
- direct: a public machine fetches from another public machine (the same-run reference);
- port-mapped: a public machine fetches from a home behind a cone NAT whose router runs
  miniupnpd (the home maps its port; no relay anywhere);
- punched: two homes behind cone NATs, both registered with a public relay: the fetch
  starts relayed and goes direct once the punch succeeds;
- punched behind CGNAT: two homes each behind a cone home router behind a cone carrier NAT
  (``NetBed.home(..., carrier_nat=True)``): two NATs in a row, then as punched;
- punched over IPv6: two homes whose IPv4 is behind symmetric NATs and whose IPv6 is routed
  behind stateful firewalls: the punch opens the firewalls;
- relayed: two homes behind symmetric (fully-random) NATs and the relay: relayed throughout.
For a small and a larger share, per path: time to the first verified byte
(``first_byte_seconds`` of the daemon's fetch report: from the fetch's start in the daemon,
dialling included) and throughput (share bytes / whole fetch time), p50 of ``--runs``. The
relay runs with ``--relay-client-rate`` raised to 1 GiB/s so the row measures the path, not
the default per-client cap (8 MiB/s).

Then, per path, ``p2pfs connect`` with the ticket (``--connects`` times; each a new
connection): the time to an authenticated connection, and for the punched path the time
until the direct one is up (the relayed connect plus the punch) and how many punches got
through. The relay's CPU time per GiB it forwarded over the whole run is the last row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from tests.support.netbed import Machine, NetBed, can_build_nat, can_build_upnp, scratch_bed

MiB = 1 << 20
RELAY_RATE = str(1 << 30)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks nat")
    parser.add_argument("--runs", type=int, default=3, help="fetches per path and size (p50)")
    parser.add_argument("--small-kib", type=int, default=64, help="the small share's size")
    parser.add_argument("--large-mib", type=int, default=32, help="the larger share's size")
    parser.add_argument(
        "--connects", type=int, default=20, help="`p2pfs connect` tries per path (punch success)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    reason = can_build_nat()
    if reason is not None:
        print(f"bench nat: cannot build the namespace bed here: {reason}")
        return 0
    sizes = {"small": args.small_kib * 1024, "large": args.large_mib * MiB}
    with scratch_bed("p2pfs-bench-nat-", "p2q") as (bed, scratch):
        figures = run(bed, scratch, sizes, args.runs, args.connects)
    if args.json:
        print(json.dumps(figures))
    else:
        print_table(figures, sizes)
    return 0


Fetch = Callable[[str], dict[str, float]]
"""Fetch a ticket once; the daemon's fetch report."""


def run(
    bed: NetBed, root: Path, sizes: dict[str, int], runs: int, connects: int
) -> dict[str, dict[str, object]]:
    relay = bed.machine("relay")
    relay.start("--relay", "--relay-client-rate", RELAY_RATE)
    pairs = _pairs(bed, ("--relay-via", f"{relay.address}:7337"))
    sources = {}
    for name, size in sizes.items():
        source = root / "data" / name
        source.mkdir(parents=True)
        (source / f"{name}.bin").write_bytes(os.urandom(size))
        sources[name] = source
    counter = itertools.count()
    assert relay.daemon is not None
    relay_cpu = psutil.Process(relay.daemon.pid)
    cpu_before = _cpu_seconds(relay_cpu)
    forwarded_before = _forwarded(relay)
    figures: dict[str, dict[str, object]] = {}
    for path, pair in pairs.items():
        if isinstance(pair, str):
            figures[path] = {"skipped": pair}
            continue
        holder, fetcher = pair
        row: dict[str, object] = {}
        # Tickets made before the two ever met: later ones may name the public address a
        # punch taught the holder, which its NAT then still lets the fetcher through on.
        tickets = {
            name: holder.cli("share", str(source)).stdout.strip().splitlines()[-1]
            for name, source in sources.items()
        }
        first_ticket = next(iter(tickets.values()))
        for name, ticket in tickets.items():
            processes = {"holder": holder, "fetcher": fetcher, "relay": relay}
            destinations = [root / "copies" / f"{path}-{name}-{next(counter)}" for _ in range(runs)]
            row[name] = _fetches(fetcher, ticket, destinations, processes)
        row["connect"] = _connects(fetcher, first_ticket, connects)
        figures[path] = row
    forwarded = _forwarded(relay) - forwarded_before
    figures["relay"] = {
        "cpu_s": _cpu_seconds(relay_cpu) - cpu_before,
        "bytes_forwarded": forwarded,
    }
    return figures


def _pairs(bed: NetBed, via: tuple[str, ...]) -> dict[str, tuple[Machine, Machine] | str]:
    """Each path's (holder, fetcher), their daemons up (homes registered with the relay
    ``via`` names), or why the path is skipped."""
    pub_a, pub_b = bed.machine("puba"), bed.machine("pubb")
    pub_a.start()
    pub_b.start()
    pairs: dict[str, tuple[Machine, Machine] | str] = {"direct": (pub_a, pub_b)}
    upnp_reason = can_build_upnp()
    if upnp_reason is None:
        mapped = bed.home("mapped", "cone", upnp=True)
        mapped.start()
        pairs["port-mapped"] = (mapped, pub_b)
    else:
        pairs["port-mapped"] = upnp_reason
    cone_a, cone_b = bed.home("conea", "cone"), bed.home("coneb", "cone")
    cgn_a = bed.home("cgna", "cone", carrier_nat=True)
    cgn_b = bed.home("cgnb", "cone", carrier_nat=True)
    six_a = bed.home("sixa", "symmetric", ipv6=True)
    six_b = bed.home("sixb", "symmetric", ipv6=True)
    sym_a, sym_b = bed.home("syma", "symmetric"), bed.home("symb", "symmetric")
    homes = (cone_a, cone_b, cgn_a, cgn_b, six_a, six_b, sym_a, sym_b)
    for home in homes:
        home.start(*via)
    pairs["punched"] = (cone_a, cone_b)
    pairs["punched behind CGNAT"] = (cgn_a, cgn_b)
    pairs["punched over IPv6"] = (six_a, six_b)
    pairs["relayed"] = (sym_a, sym_b)
    for home in homes:
        _wait(partial(_registered, home), 30, "relay registration")
    if isinstance(pairs["port-mapped"], tuple):
        _wait(partial(_mapped, pairs["port-mapped"][0]), 30, "the gateway's mapping")
    return pairs


def _fetches(
    fetcher: Machine, ticket: str, destinations: list[Path], processes: dict[str, Machine]
) -> dict[str, object]:
    """One fetch of ``ticket`` into each destination: first byte, rate, and each
    process's CPU per GiB over them all."""
    before = {who: _cpu_of(machine) for who, machine in processes.items()}
    reports = []
    for dest in destinations:
        result = fetcher.cli("fetch", ticket, str(dest), "--json", timeout=600)
        reports.append(json.loads(result.stdout.strip().splitlines()[-1]))
    moved = sum(float(r["bytes"]) for r in reports) / (1 << 30)
    return {
        "first_byte_s": [float(r["first_byte_seconds"]) for r in reports],
        "mb_per_s": [float(r["bytes"]) / float(r["seconds"]) / 1e6 for r in reports],
        "cpu_s_per_gib": {
            who: (_cpu_of(machine) - before[who]) / moved for who, machine in processes.items()
        },
    }


def _connects(fetcher: Machine, ticket: str, tries: int) -> dict[str, object]:
    """``p2pfs connect`` ``tries`` times: connect seconds, and the punch's outcome."""
    reports = []
    for _ in range(tries):
        result = fetcher.cli("connect", ticket, "--json", timeout=60)
        reports.append(json.loads(result.stdout))
    punches = [r["punch"] for r in reports if r["punch"] is not None]
    return {
        "paths": sorted({r["path"] for r in reports}),
        "connect_s": [float(r["connect_seconds"]) for r in reports],
        "direct_s": [
            float(r["connect_seconds"]) + float(p["seconds"])
            for r in reports
            if (p := r["punch"]) is not None and p["succeeded"]
        ],
        "punches": len(punches),
        "punched": sum(1 for p in punches if p["succeeded"]),
    }


def _cpu_of(machine: Machine) -> float:
    assert machine.daemon is not None
    return _cpu_seconds(psutil.Process(machine.daemon.pid))


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _forwarded(relay: Machine) -> int:
    info = _ident(relay)["relay"]
    assert isinstance(info, dict)
    return int(info["bytes_forwarded"])


def _ident(machine: Machine) -> dict[str, object]:
    result: dict[str, object] = json.loads(machine.cli("id", "--json").stdout)
    return result


def _registered(machine: Machine) -> bool:
    return bool(_ident(machine)["relays"])


def _mapped(machine: Machine) -> bool:
    info = _ident(machine)["port_mapping"]
    return isinstance(info, dict) and info["state"] == "mapped"


def _wait(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench nat: no {what} within {timeout:.0f} s")
        time.sleep(0.2)  # waiting on other processes


def print_table(figures: dict[str, dict[str, object]], sizes: dict[str, int]) -> None:
    table = Table(title="fetch across NATs in the namespace bed (p50; vs direct, same run)")
    table.add_column("path")
    for name, size in sizes.items():
        label = f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"
        table.add_column(f"{name} ({label}): first byte", justify="right")
        table.add_column(f"{name}: MB/s", justify="right")
    reference = figures.get("direct", {})
    for path, row in figures.items():
        if path == "relay":
            continue
        if "skipped" in row:
            table.add_row(path, f"skipped: {row['skipped']}")
            continue
        cells = []
        for name in sizes:
            first, rate = _p50(row, name, "first_byte_s"), _p50(row, name, "mb_per_s")
            base_first = _p50(reference, name, "first_byte_s")
            base_rate = _p50(reference, name, "mb_per_s")
            cells.append(f"{first * 1000:.0f} ms ({first / base_first:.1f}x)")
            cells.append(f"{rate:.1f} ({rate / base_rate:.2f}x)")
        table.add_row(path, *cells)
    console = Console(file=sys.stdout)
    console.print(table)
    console.print(connect_table(figures))
    console.print(cpu_table(figures, sizes))
    relay = figures["relay"]
    gib = float(relay["bytes_forwarded"]) / (1 << 30)  # type: ignore[arg-type]
    if gib > 0:
        cpu = float(relay["cpu_s"])  # type: ignore[arg-type]
        console.print(
            f"relay CPU: {cpu:.1f} s for {gib * 1024:.0f} MiB forwarded = {cpu / gib:.2f} s/GiB "
            "(the whole run: registrations, connects and keepalives included)"
        )


def cpu_table(figures: dict[str, dict[str, object]], sizes: dict[str, int]) -> Table:
    """Each daemon's CPU per GiB fetched over the larger share's runs: what limits a path
    on a machine whose cores all three processes share."""
    large = list(sizes)[-1]
    table = Table(title=f"CPU seconds per GiB fetched ({large} share, all runs; 2 shared cores)")
    for column in ("path", "holder", "fetcher", "relay", "sum"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for path, row in figures.items():
        entry = row.get(large)
        if not isinstance(entry, dict):
            continue
        cpu = entry["cpu_s_per_gib"]
        table.add_row(
            path,
            *(f"{cpu[who]:.1f}" for who in ("holder", "fetcher", "relay")),
            f"{sum(cpu.values()):.1f}",
        )
    return table


def connect_table(figures: dict[str, dict[str, object]]) -> Table:
    table = Table(title="time to connect with `p2pfs connect TICKET` (p50; each a new connection)")
    for column in ("path", "paths seen", "authenticated", "direct path up", "punches through"):
        table.add_column(column, justify="left" if column.startswith("path") else "right")
    for path, row in figures.items():
        entry = row.get("connect")
        if not isinstance(entry, dict):
            continue
        direct = entry["direct_s"]
        punches = int(entry["punches"])
        table.add_row(
            path,
            ", ".join(entry["paths"]),
            f"{statistics.median(entry['connect_s']) * 1000:.0f} ms",
            f"{statistics.median(direct) * 1000:.0f} ms" if direct else "-",
            f"{entry['punched']}/{punches}" if punches else "-",
        )
    return table


def _p50(row: dict[str, object], name: str, measure: str) -> float:
    entry = row[name]
    assert isinstance(entry, dict)
    return float(statistics.median(entry[measure]))
