"""An idealised Kademlia up to 1,000,000 nodes: ``python simulations/dht/scale.py``.

Not the package code: ``simulate.py`` runs the real DHT (asyncio, datagrams, tokens, latency)
and tops out near 10,000 nodes in one process. This model keeps only what decides hops and
load, so it reaches a million nodes in minutes:

- **Ids**: N distinct random 64-bit integers (no two collide at these sizes; with 256-bit ids
  the buckets beyond the first ~20 are empty anyway), sorted once.
- **Routing tables**: ideal and built on demand. Bucket i of node x holds the nodes whose id
  shares x's top 63 - i bits and differs in bit i; in the sorted id space those are one
  contiguous range, found by binary search. A bucket with more than k nodes keeps k of them
  sampled uniformly (seeded per node, so a node's table is the same every time it is built);
  no node is ever missing from a table because it was unlucky at join time, no contact is
  stale unless churn made it so.
- **Records**: a key's provider record sits on the k nodes nearest the key (exact).
- **Lookup**: the package's iterative crawl: start from the k nearest contacts in the
  seeker's table; each round queries the alpha nearest not yet asked (all of the k nearest
  not yet asked when a round brought nothing nearer); a queried node answers with the k
  nearest contacts of its own table; the lookup ends after the round in which a record
  holder was asked (success) or when the k nearest have all been asked (failure).
- **Churn** (``--churn``): that fraction of nodes is gone after the records were stored and
  before the lookups; they stay in every routing table (no refresh: the worst case) and a
  query to one is counted but brings nothing.
- **No** latency, timeouts, loss, message sizes, joins or refreshes: hops are crawl rounds and
  load is counted in queries (one request and one reply each).

Per-node load: with uniformly random keys, a lookup costs the network ``queries/lookup``
requests, so if every node makes one lookup, each node answers that many on average. The
routing-table size is measured exactly (sum over buckets of min(k, nodes in range)) on a
sample of nodes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    import numpy as np
except ImportError:
    raise SystemExit("scale.py needs numpy: pip install -e '.[sim]'") from None

BITS = 64
TOP = BITS - 1


@dataclass
class ScaleResult:
    nodes: int
    churn: float
    lookups: int
    success: float
    hops_mean: float
    hops_median: float
    hops_p95: float
    queries_per_lookup: float
    table_mean: float
    table_p99: float
    buckets_mean: float
    seconds: float


class Network:
    def __init__(self, nodes: int, *, ksize: int, alpha: int, seed: int) -> None:
        self.rng = np.random.default_rng([seed, nodes])
        self.seed = seed
        self.ksize = ksize
        self.alpha = alpha
        ids = np.unique(self.rng.integers(0, 2**BITS, size=nodes, dtype=np.uint64))
        while len(ids) < nodes:  # a collision: astronomically rare at 64 bits
            extra = self.rng.integers(0, 2**BITS, size=nodes - len(ids), dtype=np.uint64)
            ids = np.unique(np.concatenate([ids, extra]))
        self.ids = ids
        self.size = nodes
        self.alive = np.ones(nodes, dtype=bool)
        self._tables: dict[int, np.ndarray] = {}
        shifts = np.arange(BITS, dtype=np.uint64)
        self._shifts = shifts
        self._spans = (np.uint64(1) << shifts) - np.uint64(1)

    def bucket_ranges(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """Start and end (sorted positions) of each of the node's 64 bucket ranges."""
        x = self.ids[node]
        low = ((x >> self._shifts) ^ np.uint64(1)) << self._shifts
        high = low + self._spans
        return (
            np.searchsorted(self.ids, low, side="left"),
            np.searchsorted(self.ids, high, side="right"),
        )

    def table(self, node: int) -> np.ndarray:
        """The node's contacts (positions in ``ids``), built once and kept."""
        known = self._tables.get(node)
        if known is not None:
            return known
        starts, ends = self.bucket_ranges(node)
        rng = np.random.default_rng([self.seed, self.size, node])
        parts = []
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            if end - start <= self.ksize:
                if end > start:
                    parts.append(np.arange(start, end))
            else:
                parts.append(start + rng.choice(end - start, size=self.ksize, replace=False))
        contacts = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        self._tables[node] = contacts
        return contacts

    def table_sizes(self, sample: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact routing-table sizes and non-empty bucket counts of ``sample`` random nodes."""
        nodes = self.rng.choice(self.size, size=min(sample, self.size), replace=False)
        x = self.ids[nodes][:, None]
        low = ((x >> self._shifts) ^ np.uint64(1)) << self._shifts
        high = low + self._spans
        counts = np.searchsorted(self.ids, high, side="right") - np.searchsorted(
            self.ids, low, side="left"
        )
        return np.minimum(counts, self.ksize).sum(axis=1), (counts > 0).sum(axis=1)

    def nearest(self, contacts: np.ndarray, target: np.uint64, count: int) -> list[int]:
        """The ``count`` contacts nearest ``target`` by XOR, nearest first."""
        distances = self.ids[contacts] ^ target
        if len(contacts) > count:
            chosen = np.argpartition(distances, count)[:count]
            contacts, distances = contacts[chosen], distances[chosen]
        return [int(c) for c in contacts[np.argsort(distances)]]

    def holders(self, target: np.uint64) -> set[int]:
        """The k nodes nearest ``target``: those inside the smallest aligned prefix block
        around it that holds at least k nodes, sorted by XOR."""
        for shift in range(BITS + 1):
            span = (1 << shift) - 1
            low = (int(target) >> shift) << shift
            start = int(np.searchsorted(self.ids, np.uint64(low), side="left"))
            end = int(np.searchsorted(self.ids, np.uint64(low + span), side="right"))
            if end - start >= self.ksize:
                return set(self.nearest(np.arange(start, end), target, self.ksize))
        raise AssertionError("fewer than k nodes")

    def lookup(self, seeker: int, target: np.uint64) -> tuple[bool, int, int]:
        """(found, rounds, queries) of one provider lookup from ``seeker``."""
        holders = self.holders(target)
        if seeker in holders:
            return True, 0, 0
        live_holders = {h for h in holders if self.alive[h]}
        distance: dict[int, int] = {}
        for contact in self.nearest(self.table(seeker), target, self.ksize):
            distance[contact] = int(self.ids[contact]) ^ int(target)
        contacted: set[int] = set()
        previous: list[int] = []
        rounds = queries = 0
        while True:
            nearest = sorted(distance, key=distance.__getitem__)[: self.ksize]
            waiting = [node for node in nearest if node not in contacted]
            if not waiting:
                return False, rounds, queries
            batch = waiting if nearest == previous else waiting[: self.alpha]
            previous = nearest
            rounds += 1
            found = False
            for node in batch:
                contacted.add(node)
                queries += 1
                if not self.alive[node]:
                    del distance[node]
                    continue
                found = found or node in live_holders
                for contact in self.nearest(self.table(node), target, self.ksize):
                    if contact != seeker and contact not in distance:
                        if contact in contacted:
                            continue  # asked before and dropped as gone
                        distance[contact] = int(self.ids[contact]) ^ int(target)
            if found:
                return True, rounds, queries


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def measure(
    nodes: int,
    *,
    churn: Sequence[float],
    lookups: int,
    ksize: int,
    alpha: int,
    seed: int,
    table_sample: int = 10_000,
) -> list[ScaleResult]:
    started = time.perf_counter()
    network = Network(nodes, ksize=ksize, alpha=alpha, seed=seed)
    sizes, buckets = network.table_sizes(table_sample)
    results = []
    for level in churn:
        level_started = time.perf_counter()
        network.alive[:] = True
        gone = network.rng.choice(nodes, size=round(level * nodes), replace=False)
        network.alive[gone] = False
        live = np.flatnonzero(network.alive)
        seekers = network.rng.choice(live, size=lookups)
        targets = network.rng.integers(0, 2**BITS, size=lookups, dtype=np.uint64)
        found = queries = 0
        hops: list[int] = []
        for seeker, target in zip(seekers.tolist(), targets, strict=True):
            ok, rounds, asked = network.lookup(int(seeker), target)
            queries += asked
            if ok:
                found += 1
                hops.append(rounds)
        elapsed = time.perf_counter() - level_started
        if not results:
            elapsed += level_started - started  # building the id space counts once
        results.append(
            ScaleResult(
                nodes=nodes,
                churn=level,
                lookups=lookups,
                success=found / lookups,
                hops_mean=statistics.fmean(hops) if hops else float("nan"),
                hops_median=statistics.median(hops) if hops else float("nan"),
                hops_p95=_percentile(hops, 0.95) if hops else float("nan"),
                queries_per_lookup=queries / lookups,
                table_mean=float(sizes.mean()),
                table_p99=float(np.percentile(sizes, 99)),
                buckets_mean=float(buckets.mean()),
                seconds=elapsed,
            )
        )
    return results


def run(
    *,
    sizes: Sequence[int],
    churn: Sequence[float],
    lookups: int,
    ksize: int = 20,
    alpha: int = 3,
    seed: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    rows = []
    for nodes in sizes:
        for row in measure(
            nodes, churn=churn, lookups=lookups, ksize=ksize, alpha=alpha, seed=seed
        ):
            rows.append(asdict(row))
            if progress:
                print(
                    f"  {nodes:,} nodes, {row.churn:.0%} churn: {row.seconds:.1f} s",
                    file=sys.stderr,
                )
    return {"ksize": ksize, "alpha": alpha, "seed": seed, "lookups": lookups, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| nodes | churn | success | hops mean | hops median | hops p95 | log2(N)/2 "
        "| queries/lookup | routing table mean | table p99 | non-empty buckets |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['nodes']:,} | {row['churn']:.0%} | {row['success']:.2%} "
            f"| {row['hops_mean']:.2f} | {row['hops_median']:g} | {row['hops_p95']:g} "
            f"| {math.log2(row['nodes']) / 2:.2f} | {row['queries_per_lookup']:.1f} "
            f"| {row['table_mean']:.0f} | {row['table_p99']:.0f} | {row['buckets_mean']:.1f} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Hops, queries per lookup and routing-table size against N, one line per churn level."""
    try:
        import matplotlib  # noqa: PLC0415 - optional: pip install -e '.[sim]'

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print(
            "matplotlib is not installed: plot skipped (pip install -e '.[sim]')", file=sys.stderr
        )
        return None
    rows = result["rows"]
    levels = sorted({row["churn"] for row in rows})
    sizes = sorted({row["nodes"] for row in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    hops_ax, load_ax, table_ax = axes
    for i, level in enumerate(levels):
        mine = sorted((r for r in rows if r["churn"] == level), key=lambda r: r["nodes"])
        n = [r["nodes"] for r in mine]
        style = {"marker": "o", "linestyle": "-" if i == 0 else "--", "color": f"C{i}"}
        label = f"{level:.0%} churn"
        hops_ax.plot(n, [r["hops_mean"] for r in mine], label=f"mean, {label}", **style)
        hops_ax.plot(n, [r["hops_p95"] for r in mine], label=f"p95, {label}", alpha=0.5, **style)
        load_ax.plot(n, [r["queries_per_lookup"] for r in mine], label=label, **style)
    hops_ax.plot(
        sizes, [math.log2(n) / 2 for n in sizes], ":", color="crimson", label="goal: log2(N)/2"
    )
    first = sorted((r for r in rows if r["churn"] == levels[0]), key=lambda r: r["nodes"])
    table_ax.plot([r["nodes"] for r in first], [r["table_mean"] for r in first], "o-", label="mean")
    table_ax.plot([r["nodes"] for r in first], [r["table_p99"] for r in first], "o--", label="p99")
    for ax, title, ylabel in (
        (hops_ax, "Hops (crawl rounds) per lookup", "rounds"),
        (
            load_ax,
            "Queries per lookup\n(= requests each node answers per lookup it makes)",
            "queries",
        ),
        (table_ax, "Routing-table size", "contacts"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("nodes (N)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Idealised Kademlia (k={result['ksize']}, alpha={result['alpha']}, "
        f"{result['lookups']} lookups per point, seed {result['seed']})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--churn", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    parser.add_argument("--lookups", type=int, default=10_000)
    parser.add_argument("--ksize", type=int, default=20)
    parser.add_argument("--alpha", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path(__file__).resolve().parent / "scale.png",
        metavar="FILE",
        help="where the PNG goes (default: scale.png beside this script); needs matplotlib",
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(
        sizes=args.nodes,
        churn=args.churn,
        lookups=args.lookups,
        ksize=args.ksize,
        alpha=args.alpha,
        seed=args.seed,
        progress=not args.json,
    )
    result["total_seconds"] = time.perf_counter() - started
    written = None if args.no_plot else plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"idealised Kademlia, k={args.ksize}, alpha={args.alpha}, seed {args.seed}, "
        f"{args.lookups} lookups per row; total {result['total_seconds']:.0f} s"
    )
    print(table(result))
    if written is not None:
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
