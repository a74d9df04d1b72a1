"""Simulate the private DHT at scale: ``python simulations/dht/simulate.py --nodes 10000``.

Drives the real code, unchanged: ``p2pfs.discovery.dht.node.DhtNode`` (the ``kademlia``
package's routing table, k-buckets and spider crawls, our provider lookup and announce) over
``DhtProtocol`` (datagram encoding, validation, write tokens, record store). Only the socket
is replaced: an in-memory datagram transport delivers each datagram after a modelled one-way
latency, on an asyncio loop whose clock is virtual (the selector advances time to the next
timer instead of sleeping), so a run takes CPU time only and is reproducible from its seed.

Latency model: each node has an access delay drawn from a log-normal distribution (median
15 ms, clipped to 2-200 ms); a datagram from a to b takes access(a) + access(b) plus up to
2 ms of uniform jitter; ``--loss`` drops that fraction of datagrams.

Churn model: the chosen fraction of nodes (providers included) vanish at once without
notice (their datagrams are dropped from then on) right after the keys were announced, and
lookups start immediately, before any table refresh. A lookup asks for a key whose provider
is still alive (a departed provider's records rightly expire after the 30-minute TTL) and
succeeds when it returns that provider's record; live providers re-announce at 2/3 of the
TTL, as ``DhtFinder`` does, since a level's lookups run one after another in virtual time and
span hours. Each churn level starts again from the full network (the departed nodes come
back, but what live nodes learned during the previous level, such as contacts dropped on
timeout, stays).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import selectors
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pfs.discovery.dht.messages import dht_key
from p2pfs.discovery.dht.node import DhtNode

Address = tuple[str, int]
TTL = 1800.0


class SimulationStalled(RuntimeError):
    """Nothing is scheduled and nothing is ready: the awaited result can never come."""


class _VirtualSelector(selectors.SelectSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise SimulationStalled("no timer and nothing ready")
        self._loop.now += max(0.0, timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose time jumps to the next timer whenever nothing is ready."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self.now


class MemoryTransport(asyncio.DatagramTransport):
    def __init__(self, network: Network, address: Address) -> None:
        super().__init__()
        self._network = network
        self._address = address

    def sendto(self, data: bytes, addr: Any = None) -> None:  # type: ignore[override]
        self._network.send(self._address, addr, bytes(data))

    def close(self) -> None:
        self._network.endpoints.pop(self._address, None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._address if name == "sockname" else default


class Network:
    def __init__(self, loop: VirtualTimeLoop, rng: random.Random, loss: float) -> None:
        self.loop = loop
        self.rng = rng
        self.loss = loss
        self.endpoints: dict[Address, asyncio.DatagramProtocol] = {}
        self.down: set[Address] = set()
        self.access: dict[Address, float] = {}
        self.datagrams = 0
        self.bytes = 0

    def attach(self, address: Address, protocol: asyncio.DatagramProtocol) -> MemoryTransport:
        self.endpoints[address] = protocol
        self.access[address] = min(0.2, max(0.002, self.rng.lognormvariate(math.log(0.015), 0.6)))
        transport = MemoryTransport(self, address)
        protocol.connection_made(transport)
        return transport

    def send(self, source: Address, target: Address, data: bytes) -> None:
        if source in self.down:
            return
        self.datagrams += 1
        self.bytes += len(data)
        if self.loss and self.rng.random() < self.loss:
            return
        delay = self.access[source] + self.access.get(target, 0.0) + self.rng.uniform(0, 0.002)
        self.loop.call_later(delay, self._arrive, source, target, data)

    def _arrive(self, source: Address, target: Address, data: bytes) -> None:
        protocol = self.endpoints.get(target)
        if protocol is not None and target not in self.down:
            protocol.datagram_received(data, source)


@dataclass
class LevelResult:
    churn: float
    lookups: int
    success: float
    hops_median: float
    hops_p95: float
    latency_median_ms: float
    latency_p95_ms: float
    messages_per_lookup: float
    bytes_per_lookup: float
    hops: list[int] = field(default_factory=list)
    """Hops of each successful lookup, in order (for the distributions and plots)."""
    latencies_ms: list[float] = field(default_factory=list)
    """Latency of each successful lookup, in order."""


def _percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


class Simulation:
    def __init__(self, *, nodes: int, seed: int, ksize: int, alpha: int, loss: float) -> None:
        self.rng = random.Random(seed)
        self.loop = VirtualTimeLoop()
        self.network = Network(self.loop, self.rng, loss)
        self.size = nodes
        self.ksize = ksize
        self.alpha = alpha
        self.nodes: list[DhtNode] = []
        self.addresses: list[Address] = []
        self.keys: dict[bytes, int] = {}
        """Discovery key -> index of its provider."""
        self.announced: dict[bytes, float] = {}

    def _new_node(self, index: int) -> tuple[DhtNode, Address]:
        node = DhtNode(
            node_id=self.rng.randbytes(32),
            ksize=self.ksize,
            alpha=self.alpha,
            clock=self.loop.time,
            random_bytes=self.rng.randbytes,
        )
        address = (f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}", 4000)
        node.transport = self.network.attach(address, node.protocol)
        return node, address

    async def build(self, progress: bool) -> None:
        """Nodes join one at a time, each through a random node already in."""
        for index in range(self.size):
            node, address = self._new_node(index)
            if self.nodes:
                await node.bootstrap([self.rng.choice(self.addresses)])
            self.nodes.append(node)
            self.addresses.append(address)
            if progress and index % 1000 == 999:
                print(f"  {index + 1} nodes joined", file=sys.stderr)

    async def announce(self, keys: int) -> None:
        for _ in range(keys):
            key = self.rng.randbytes(32)
            self.keys[key] = self.rng.randrange(self.size)
            await self._announce(key)

    async def _announce(self, key: bytes) -> None:
        node = self.nodes[self.keys[key]]
        await node.announce(dht_key(key), bytes(32), 7000, round(TTL))
        self.announced[key] = self.loop.time()

    async def measure(self, churn: float, lookups: int) -> LevelResult:
        gone = set(self.rng.sample(range(self.size), round(churn * self.size)))
        self.network.down = {self.addresses[i] for i in gone}
        live = [i for i in range(self.size) if i not in gone]
        keys = [key for key, provider in self.keys.items() if provider not in gone]
        found = 0
        hops: list[int] = []
        latencies: list[float] = []
        messages = 0
        volume = 0
        for _ in range(lookups):
            key = self.rng.choice(keys)
            if self.loop.time() - self.announced[key] >= TTL * 2 / 3:
                await self._announce(key)  # as a live provider's DhtFinder does
            # Never the provider itself: a daemon leaves its own records out of a lookup.
            seeker = self.nodes[self.rng.choice([i for i in live if i != self.keys[key]])]
            before = (self.network.datagrams, self.network.bytes, self.loop.time())
            lookup = await seeker.find_providers(dht_key(key), 16)
            messages += self.network.datagrams - before[0]
            volume += self.network.bytes - before[1]
            provider_ip = self.addresses[self.keys[key]][0]
            if any(p.ip == provider_ip for p in lookup.providers):
                found += 1
                hops.append(lookup.rounds)
                latencies.append((self.loop.time() - before[2]) * 1000)
        self.network.down = set()
        return LevelResult(
            churn=churn,
            lookups=lookups,
            success=found / lookups,
            hops_median=statistics.median(hops) if hops else float("nan"),
            hops_p95=_percentile(hops, 0.95),
            latency_median_ms=statistics.median(latencies) if latencies else float("nan"),
            latency_p95_ms=_percentile(latencies, 0.95),
            messages_per_lookup=messages / lookups,
            bytes_per_lookup=volume / lookups,
            hops=hops,
            latencies_ms=[round(ms, 3) for ms in latencies],
        )

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.loop.run_until_complete(_drain())
        self.loop.close()


async def _drain() -> None:
    current = asyncio.current_task()
    while tasks := [task for task in asyncio.all_tasks() if task is not current]:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(
    *,
    nodes: int,
    seed: int,
    churn: list[float],
    lookups: int,
    keys: int,
    ksize: int = 20,
    alpha: int = 3,
    loss: float = 0.0,
    progress: bool = False,
) -> dict[str, Any]:
    sim = Simulation(nodes=nodes, seed=seed, ksize=ksize, alpha=alpha, loss=loss)
    started = time.perf_counter()
    try:
        sim.loop.run_until_complete(sim.build(progress))
        built = time.perf_counter()
        datagrams_to_build = sim.network.datagrams
        sim.loop.run_until_complete(sim.announce(keys))
        levels = [sim.loop.run_until_complete(sim.measure(c, lookups)) for c in churn]
        contacts = [node.contacts() for node in sim.nodes]
    finally:
        sim.close()
    return {
        "nodes": nodes,
        "seed": seed,
        "ksize": ksize,
        "alpha": alpha,
        "loss": loss,
        "keys": keys,
        "hop_goal": math.log2(nodes) / 2,
        "contacts_median": statistics.median(contacts),
        "datagrams_per_join": datagrams_to_build / nodes,
        "build_seconds": built - started,
        "total_seconds": time.perf_counter() - started,
        "levels": [asdict(level) for level in levels],
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| churn | lookups | success | hops median | hops p95 | latency median | "
        "latency p95 | datagrams/lookup | bytes/lookup |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in result["levels"]:
        lines.append(
            f"| {level['churn']:.0%} | {level['lookups']} | {level['success']:.2%} "
            f"| {level['hops_median']:g} | {level['hops_p95']:g} "
            f"| {level['latency_median_ms']:.0f} ms | {level['latency_p95_ms']:.0f} ms "
            f"| {level['messages_per_lookup']:.1f} | {level['bytes_per_lookup']:,.0f} |"
        )
    return "\n".join(lines)


def _pyplot(purpose: str) -> Any:
    """matplotlib's pyplot on the Agg backend, or None (with a message) when not installed."""
    try:
        import matplotlib  # noqa: PLC0415 - optional: pip install -e '.[sim]'

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print(
            f"matplotlib is not installed: {purpose} skipped (pip install -e '.[sim]')",
            file=sys.stderr,
        )
        return None
    return plt


def _subtitle(result: dict[str, Any]) -> str:
    return (
        f"{result['nodes']:,} nodes, k={result['ksize']}, alpha={result['alpha']}, "
        f"seed {result['seed']}, {result['levels'][0]['lookups']} lookups per level"
    )


def plot(result: dict[str, Any], directory: Path) -> list[Path]:
    """Draw success rate, hop-count and latency distributions per churn level as PNGs."""
    plt = _pyplot("plots")
    if plt is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    levels = result["levels"]
    labels = [f"{level['churn']:.0%} churn" for level in levels]
    colours = plt.get_cmap("viridis")(
        [i / max(1, len(levels) - 1) * 0.85 for i in range(len(levels))]
    )
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    rates = [level["success"] * 100 for level in levels]
    bars = ax.bar(labels, rates, color=colours)
    ax.bar_label(bars, labels=[f"{rate:.2f}%" for rate in rates], padding=2)
    ax.axhline(99, color="crimson", linestyle="--", linewidth=1, label="goal at 30% churn: 99%")
    ax.set_ylim(min(90.0, min(rates) - 2), 101.5)
    ax.set_ylabel("lookups that found the provider (%)")
    ax.set_title(f"Lookup success rate\n{_subtitle(result)}", fontsize=10)
    ax.legend(loc="lower left")
    written.append(_save(plt, fig, directory / "success.png"))

    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    top = max((max(level["hops"], default=0) for level in levels), default=0)
    width = 0.8 / len(levels)
    for i, level in enumerate(levels):
        count = max(1, len(level["hops"]))
        shares = [100 * level["hops"].count(h) / count for h in range(top + 1)]
        ax.bar(
            [h + (i - (len(levels) - 1) / 2) * width for h in range(top + 1)],
            shares,
            width=width,
            color=colours[i],
            label=f"{labels[i]} (median {level['hops_median']:g})",
        )
    ax.axvline(result["hop_goal"], color="crimson", linestyle="--", linewidth=1)
    ax.text(
        result["hop_goal"],
        ax.get_ylim()[1] * 0.95,
        " goal: median <= log2(N)/2",
        color="crimson",
        va="top",
        fontsize=8,
    )
    ax.set_xticks(range(top + 1))
    ax.set_xlabel("hops (crawl rounds; 0 = answered from the node's own records)")
    ax.set_ylabel("share of successful lookups (%)")
    ax.set_title(f"Hop-count distribution\n{_subtitle(result)}", fontsize=10)
    ax.legend()
    written.append(_save(plt, fig, directory / "hops.png"))

    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for i, level in enumerate(levels):
        values = sorted(level["latencies_ms"])
        if not values:
            continue
        ax.step(
            values,
            [100 * (n + 1) / len(values) for n in range(len(values))],
            where="post",
            color=colours[i],
            label=f"{labels[i]} (median {level['latency_median_ms']:.0f} ms, "
            f"p95 {level['latency_p95_ms']:.0f} ms)",
        )
    ax.set_xscale("log")
    ax.set_xlabel(
        "lookup latency (ms, virtual clock, log scale; answered locally = 0 ms, off scale)"
    )
    ax.set_ylabel("lookups completed within (%)")
    ax.set_ylim(0, 101)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"Lookup latency distribution (CDF)\n{_subtitle(result)}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    written.append(_save(plt, fig, directory / "latency.png"))
    return written


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--churn", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--ksize", type=int, default=20)
    parser.add_argument("--alpha", type=int, default=3)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--plots",
        type=Path,
        default=Path(__file__).resolve().parent,
        metavar="DIR",
        help="where the PNG plots go (default: beside this script); needs matplotlib",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--save", type=Path, metavar="FILE", help="also write the result as JSON")
    parser.add_argument(
        "--replot", type=Path, metavar="FILE", help="only draw the plots of a saved result"
    )
    args = parser.parse_args(argv)
    if args.replot:
        result = json.loads(args.replot.read_text())
        for path in plot(result, args.plots):
            print(f"wrote {path}")
        return 0
    # The package logs a warning for every unanswered call; churn makes thousands of them.
    logging.getLogger("kademlia").setLevel(logging.ERROR)
    result = run(
        nodes=args.nodes,
        seed=args.seed,
        churn=args.churn,
        lookups=args.lookups,
        keys=args.keys,
        ksize=args.ksize,
        alpha=args.alpha,
        loss=args.loss,
        progress=not args.json,
    )
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(result) + "\n")
    plots = [] if args.no_plots else plot(result, args.plots)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['nodes']} nodes, seed {result['seed']}, k={result['ksize']}, "
        f"alpha={result['alpha']}, loss {result['loss']:.0%}, {result['keys']} keys; "
        f"median routing table {result['contacts_median']:g} contacts; "
        f"{result['datagrams_per_join']:.0f} datagrams per join; hop goal <= "
        f"{result['hop_goal']:.2f}; built in {result['build_seconds']:.0f} s, "
        f"total {result['total_seconds']:.0f} s"
    )
    print(table(result))
    for path in plots:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
