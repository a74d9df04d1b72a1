"""``python -m p2pfs.bench nat``: fetches across the namespace bed's NATs, by path.

One bed (p2pfs/bench/netbed.py; needs root, ``ip`` and ``nft``; the port-mapped row also
``miniupnpd``), real daemons at their defaults plus the flags each path needs:
- direct: a public machine fetches from another public machine (the same-run reference);
- port-mapped: a public machine fetches from a home behind a cone NAT whose router runs
  miniupnpd (the home maps its port; no relay anywhere);
- punched: two homes behind cone NATs, both registered with a public relay: the fetch
  starts relayed and goes direct once the punch succeeds;
- relayed: two homes behind symmetric (fully-random) NATs and the relay: relayed throughout.
For a small and a larger share, per path: time to the first verified byte
(``first_byte_seconds`` of the daemon's fetch report: from the fetch's start in the daemon,
dialling included) and throughput (share bytes / whole fetch time), p50 of ``--runs``. The
relay runs with ``--relay-client-rate`` raised to 1 GiB/s so the row measures the path, not
the default per-client cap (8 MiB/s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2pfs.bench.netbed import Machine, NetBed, can_build_nat, can_build_upnp, new_tag

MiB = 1 << 20
RELAY_RATE = str(1 << 30)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pfs.bench nat")
    parser.add_argument("--runs", type=int, default=3, help="fetches per path and size (p50)")
    parser.add_argument("--small-kib", type=int, default=64, help="the small share's size")
    parser.add_argument("--large-mib", type=int, default=32, help="the larger share's size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    reason = can_build_nat()
    if reason is not None:
        print(f"bench nat: cannot build the namespace bed here: {reason}")
        return 0
    sizes = {"small": args.small_kib * 1024, "large": args.large_mib * MiB}
    with tempfile.TemporaryDirectory(prefix="p2pfs-bench-nat-") as scratch:
        bed = NetBed(Path(scratch), new_tag("p2q"))
        try:
            figures = run(bed, Path(scratch), sizes, args.runs)
        finally:
            bed.close()
    if args.json:
        print(json.dumps(figures))
    else:
        print_table(figures, sizes)
    return 0


Fetch = Callable[[str], dict[str, float]]
"""Fetch a ticket once; the daemon's fetch report."""


def run(bed: NetBed, root: Path, sizes: dict[str, int], runs: int) -> dict[str, dict[str, object]]:
    relay = bed.machine("relay")
    relay.start("--relay", "--relay-client-rate", RELAY_RATE)
    via = ("--relay-via", f"{relay.address}:7337")
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
    sym_a, sym_b = bed.home("syma", "symmetric"), bed.home("symb", "symmetric")
    for home in (cone_a, cone_b, sym_a, sym_b):
        home.start(*via)
    pairs["punched"] = (cone_a, cone_b)
    pairs["relayed"] = (sym_a, sym_b)
    for home in (cone_a, cone_b, sym_a, sym_b):
        _wait(partial(_registered, home), 30, "relay registration")
    if isinstance(pairs["port-mapped"], tuple):
        _wait(partial(_mapped, pairs["port-mapped"][0]), 30, "the gateway's mapping")
    sources = {}
    for name, size in sizes.items():
        source = root / "data" / name
        source.mkdir(parents=True)
        (source / f"{name}.bin").write_bytes(os.urandom(size))
        sources[name] = source
    counter = itertools.count()
    figures: dict[str, dict[str, object]] = {}
    for path, pair in pairs.items():
        if isinstance(pair, str):
            figures[path] = {"skipped": pair}
            continue
        holder, fetcher = pair
        row: dict[str, object] = {}
        for name, source in sources.items():
            ticket = holder.cli("share", str(source)).stdout.strip().splitlines()[-1]
            reports = []
            for _ in range(runs):
                dest = root / "copies" / f"{path}-{name}-{next(counter)}"
                result = fetcher.cli("fetch", ticket, str(dest), "--json", timeout=600)
                reports.append(json.loads(result.stdout.strip().splitlines()[-1]))
            row[name] = {
                "first_byte_s": [float(r["first_byte_seconds"]) for r in reports],
                "mb_per_s": [float(r["bytes"]) / float(r["seconds"]) / 1e6 for r in reports],
            }
        figures[path] = row
    return figures


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
    Console(file=sys.stdout).print(table)


def _p50(row: dict[str, object], name: str, measure: str) -> float:
    entry = row[name]
    assert isinstance(entry, dict)
    return float(statistics.median(entry[measure]))
