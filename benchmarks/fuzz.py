"""``python -m benchmarks fuzz --minutes N``: the QUIC fuzzers of tests/hostile run for longer.

Prints a table: cases per second per engine and role, endpoint deaths (must be 0), engine
failures contained, RSS growth, and an honest client's connect time during an Initial flood.
The fuzzers themselves (how a case reaches the TLS parser, the mutators) are
tests/support/fuzz.py.
"""

from __future__ import annotations

import argparse
import random
import time

import trio

from p2pfs.net import ENGINES
from tests.support.fuzz import (
    FuzzResult,
    MiB,
    capture_client_hello,
    connect_during_flood,
    fuzz_client_role,
    fuzz_server_role,
    rss_bytes,
)

# -- the benchmark -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks fuzz", description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0, help="total fuzzing time")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    parser.add_argument("--flood", type=int, default=10_000, help="Initials in the flood")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    results = trio.run(_bench, args.minutes * 60, seed, args.flood)
    return 1 if any(r.deaths or not r.honest_ok for r in results) else 0


async def _bench(seconds: float, seed: int, flood_count: int) -> list[FuzzResult]:
    hellos = [capture_client_hello(name) for name in ENGINES]
    slots = [(engine, role) for engine in ENGINES for role in ("server", "client")]
    budget = seconds / len(slots)
    totals: list[FuzzResult] = []
    print(f"fuzzing {seconds:.0f} s from seed {seed}")
    for engine, role in slots:
        total = FuzzResult(engine, role, seed)
        rss_before = rss_bytes()
        deadline = time.perf_counter() + budget
        round_seed = seed
        while time.perf_counter() < deadline:
            if role == "server":
                result = await fuzz_server_role(engine, 500, round_seed, hellos)
            else:
                result = await fuzz_client_role(engine, 200, round_seed)
            total.cases += result.cases
            total.seconds += result.seconds
            total.contained += result.contained
            total.deaths += [f"seed {round_seed}: {d}" for d in result.deaths]
            if not result.honest_ok:
                print(f"  honest client failed after seed {round_seed}: {result.describe()}")
            for death in result.deaths:
                print(f"  DEATH {engine}/{role} seed {round_seed}: {death}")
            round_seed += 1
        total.honest_ok = not total.deaths
        total.rss_growth = rss_bytes() - rss_before
        totals.append(total)
    print()
    print("| engine | role | cases | cases/s | deaths | engine failures contained | RSS growth |")
    print("|---|---|---|---|---|---|---|")
    for r in totals:
        rate = r.cases / r.seconds if r.seconds else 0.0
        print(
            f"| {r.engine} | {r.role} | {r.cases} | {rate:.0f} | {len(r.deaths)} | "
            f"{r.contained} | {r.rss_growth / MiB:+.1f} MiB |"
        )
    print()
    print("| engine | Initials in flood | Retries sent | honest connect (s) |")
    print("|---|---|---|---|")
    for engine in ENGINES:
        elapsed, sent, retries = await connect_during_flood(engine, flood_count, seed)
        print(f"| {engine} | {sent} | {retries} | {elapsed:.3f} |")
    return totals
