"""Simulate a swarm: ``python simulations/swarm/simulate.py --seed 1`` (all experiments).

A seeded discrete-event model drives the real sans-I/O cores, unchanged: every downloader
has a ``p2pfs.swarm.PiecePicker`` over its neighbours and a ``PipelineController`` per
neighbour; only the network is modelled.

Model (all times in virtual seconds, one heap of events, no wall clock):

- **Content**: ``--pieces`` pieces of 256 KiB (default 128: 32 MiB).
- **Peers**: upload / download capacity from three classes: 40% 0.5 / 4 MiB/s, 40% 2 / 16
  MiB/s, 20% 10 / 50 MiB/s; the original seed uploads at 10 MiB/s. Access latency
  log-normal, median 20 ms, clipped to 2-200 ms; one-way delay between two peers is the sum
  of theirs.
- **Links**: a peer's upload link sends one piece at a time, first come first served, at its
  upload rate; the piece then passes the receiver's download link (also FIFO, at its download
  rate) after the one-way delay. Requests take the one-way delay to arrive.
- **Neighbours**: an arriving peer connects to up to ``--degree`` (20) random live peers
  that have fewer than ``2 x degree`` connections (a tracker's random peer list); a peer whose
  neighbours fall below half of that connects to more. Neighbours exchange their holdings
  on connect and announce every piece as it arrives (HAVE, applied at once).
- **Requests**: a downloader keeps ``PipelineController.target_bytes()`` requested from
  each neighbour, picking pieces with its ``PiecePicker``; arrival calls ``received`` and
  the endgame cancels it returns are applied at the uploader at once (if the piece is not
  already on the wire: those bytes count as wasted). Endgame duplicates go only to idle
  neighbours (nothing in flight), one piece at a time: ``pick(u, room, endgame=False)``
  first, then ``pick(u, 1)`` when the pipe is empty.
- **Arrivals and departures**: downloaders arrive uniformly over the first
  ``--arrival-window`` seconds (10); ``--abort`` (5%) of them leave before finishing, at a
  uniform time in their first 60 s; the rest stay after completing for an exponential time
  (mean ``--linger``, 30 s) and serve meanwhile. A departure closes its connections: the
  neighbours' ``remove_peer`` puts its outstanding pieces back in their pools.
- **The seed** stays to the end, or (extinction experiment) leaves once it has uploaded
  ``x`` times the content; the share of pieces that no live peer holds at that moment is
  *extinct*.

Experiments: ``scale`` (10, 100, 1,000 downloaders, rarest first), ``policies`` (100
downloaders: rarest first, random, sequential), ``endgame`` (100 downloaders: duplicates
uncapped, at most 2 requesters a piece, none), ``extinction`` (100 downloaders, seed leaves
after 0.5-2x the content, each policy). Results go to ``results.json`` and PNGs beside this
file; the tables in README.md are printed at the end.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pfs.swarm import PickPolicy, PiecePicker, PipelineController

MIB = 1 << 20
PIECE = 256 << 10
CLASSES = [  # (share, upload, download) in bytes/s
    (0.4, 0.5 * MIB, 4 * MIB),
    (0.4, 2 * MIB, 16 * MIB),
    (0.2, 10 * MIB, 50 * MIB),
]
SEED_UP = 10 * MIB
SEED_DOWN = 50 * MIB
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Config:
    peers: int
    pieces: int = 128
    policy: PickPolicy = PickPolicy.RAREST
    seed: int = 1
    degree: int = 20
    arrival_window: float = 10.0
    abort: float = 0.05
    linger: float = 30.0
    seed_leaves_after: float | None = None
    """Content sizes the original seed uploads before it leaves; None: it stays."""
    time_limit: float = 7200.0
    endgame: bool = True
    max_requesters: int | None = None


@dataclass(eq=False, slots=True)
class Peer:
    id: int
    up: float
    down: float
    latency: float
    is_seed: bool
    arrive: float
    have: bytearray
    picker: PiecePicker | None = None
    neighbors: set[Peer] = field(default_factory=set)
    pipes: dict[Peer, PipelineController] = field(default_factory=dict)
    queue: deque[tuple[Peer, int, float]] = field(default_factory=deque)
    sending: tuple[Peer, int] | None = None
    down_free: float = 0.0
    alive: bool = False
    done_at: float | None = None
    uploaded: int = 0
    aborts: bool = False

    def __hash__(self) -> int:
        return self.id

    @property
    def complete(self) -> bool:
        return self.picker is None or self.picker.complete


@dataclass(slots=True)
class Result:
    config: dict[str, Any]
    completion_times: list[float]
    downloaders: int
    aborted: int
    completed: int
    seed_uploaded_ratio: float
    wasted_ratio: float
    extinct_share: float | None
    seed_left_at: float | None
    end_time: float
    events: int
    wall_seconds: float


class Swarm:
    def __init__(self, config: Config) -> None:
        self.c = config
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self.heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = 0
        self.events = 0
        self.live: list[Peer] = []
        self.live_index: dict[Peer, int] = {}
        self.cancelled: set[tuple[Peer, Peer, int]] = set()  # (uploader, downloader, piece)
        self.wasted = 0
        self.delivered = 0
        self.extinct_share: float | None = None
        self.seed_left_at: float | None = None
        n = config.pieces
        self.seed = Peer(0, SEED_UP, SEED_DOWN, self._latency(), True, 0.0, bytearray([1]) * n)
        self.downloaders: list[Peer] = []
        for i in range(1, config.peers + 1):
            r = self.rng.random()
            acc = 0.0
            up, down = CLASSES[-1][1:]
            for share, cls_up, cls_down in CLASSES:
                acc += share
                if r < acc:
                    up, down = cls_up, cls_down
                    break
            arrive = self.rng.uniform(0, config.arrival_window)
            peer = Peer(i, up, down, self._latency(), False, arrive, bytearray(n))
            peer.aborts = self.rng.random() < config.abort
            self.downloaders.append(peer)

    # -- engine ------------------------------------------------------------------------------

    def at(self, when: float, action: Callable[..., None], *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, action, args))

    def run(self) -> Result:
        started = time.perf_counter()
        self.join(self.seed)
        for peer in self.downloaders:
            self.at(peer.arrive, self.join, peer)
            if peer.aborts:
                self.at(peer.arrive + self.rng.uniform(0, 60), self.leave, peer)
        while self.heap:
            when, _, action, args = heapq.heappop(self.heap)
            if when > self.c.time_limit:
                break
            self.now = when
            self.events += 1
            action(*args)
        times = [p.done_at - p.arrive for p in self.downloaders if p.done_at is not None]
        content = self.c.pieces * PIECE
        return Result(
            config={**asdict(self.c), "policy": self.c.policy.value},
            completion_times=sorted(times),
            downloaders=len(self.downloaders),
            aborted=sum(p.aborts and p.done_at is None for p in self.downloaders),
            completed=len(times),
            seed_uploaded_ratio=self.seed.uploaded / content,
            wasted_ratio=self.wasted / max(1, self.delivered),
            extinct_share=self.extinct_share,
            seed_left_at=self.seed_left_at,
            end_time=self.now,
            events=self.events,
            wall_seconds=time.perf_counter() - started,
        )

    def _latency(self) -> float:
        return min(0.2, max(0.002, self.rng.lognormvariate(math.log(0.02), 0.8)))

    def delay(self, a: Peer, b: Peer) -> float:
        return a.latency + b.latency

    # -- membership --------------------------------------------------------------------------

    def join(self, peer: Peer) -> None:
        peer.alive = True
        self.live_index[peer] = len(self.live)
        self.live.append(peer)
        if not peer.is_seed:
            peer.picker = PiecePicker(
                self.c.pieces,
                [],
                self.rng,
                policy=self.c.policy,
                max_requesters=self.c.max_requesters,
            )
        self.find_neighbors(peer)

    def find_neighbors(self, peer: Peer) -> None:
        want = self.c.degree - len(peer.neighbors)
        if want <= 0 or len(self.live) < 2:
            return
        candidates = self.rng.sample(self.live, min(len(self.live), want * 3 + 1))
        for other in candidates:
            if want <= 0:
                break
            if other is peer or other in peer.neighbors:
                continue
            if len(other.neighbors) >= 2 * self.c.degree:
                continue
            self.connect(peer, other)
            want -= 1

    def connect(self, a: Peer, b: Peer) -> None:
        a.neighbors.add(b)
        b.neighbors.add(a)
        for x, y in ((a, b), (b, a)):
            if x.picker is not None and not x.picker.complete:
                has = None if y.complete else [i for i in range(self.c.pieces) if y.have[i]]
                x.picker.add_peer(y, has)
                x.pipes[y] = PipelineController()
                self.refill(x, y)

    def leave(self, peer: Peer) -> None:
        if not peer.alive:
            return
        peer.alive = False
        i = self.live_index.pop(peer)
        last = self.live.pop()
        if last is not peer:
            self.live[i] = last
            self.live_index[last] = i
        peer.queue.clear()
        peer.sending = None
        for other in list(peer.neighbors):
            other.neighbors.discard(peer)
            peer.neighbors.discard(other)
            if other.picker is not None and not other.picker.complete:
                returned = other.picker.remove_peer(peer)
                other.pipes.pop(peer, None)
                if returned:
                    for nb in list(other.neighbors):
                        self.refill(other, nb)
            if len(other.neighbors) < self.c.degree // 2:
                self.find_neighbors(other)
        if peer is self.seed:
            self.seed_left_at = self.now
            holders = bytearray(self.c.pieces)
            for p in self.live:
                for i in range(self.c.pieces):
                    holders[i] |= p.have[i]
            self.extinct_share = holders.count(0) / self.c.pieces

    # -- requests and transfers --------------------------------------------------------------

    def refill(self, d: Peer, u: Peer) -> None:
        picker = d.picker
        pipe = d.pipes.get(u)
        if picker is None or pipe is None:
            return
        while (room := pipe.room() // PIECE) > 0:
            # Endgame duplicates go to idle neighbours only (one at a time).
            picks = picker.pick(u, room, endgame=False)
            if not picks and pipe.in_flight == 0 and self.c.endgame:
                picks = picker.pick(u, 1)
            if not picks:
                return
            for piece in picks:
                pipe.on_request(PIECE, self.now)
                self.at(self.now + self.delay(d, u), self.request_arrives, u, d, piece, self.now)

    def request_arrives(self, u: Peer, d: Peer, piece: int, sent: float) -> None:
        if not u.alive or not d.alive:
            return
        if (u, d, piece) in self.cancelled:
            self.cancelled.discard((u, d, piece))
            return
        u.queue.append((d, piece, sent))
        if u.sending is None:
            self.send_next(u)

    def send_next(self, u: Peer) -> None:
        while u.queue:
            d, piece, sent = u.queue.popleft()
            if (u, d, piece) in self.cancelled:
                self.cancelled.discard((u, d, piece))
                continue
            if not d.alive:
                continue
            u.sending = (d, piece)
            self.at(self.now + PIECE / u.up, self.sent, u, d, piece, sent)
            return
        u.sending = None

    def sent(self, u: Peer, d: Peer, piece: int, requested: float) -> None:
        if not u.alive or u.sending != (d, piece):
            return
        u.uploaded += PIECE
        if d.alive:
            start = max(self.now + self.delay(u, d), d.down_free)
            d.down_free = start + PIECE / d.down
            self.at(d.down_free, self.deliver, d, u, piece, requested)
        self.send_next(u)
        limit = self.c.seed_leaves_after
        if u is self.seed and limit is not None and u.uploaded >= limit * self.c.pieces * PIECE:
            self.leave(self.seed)

    def cancel(self, u: Peer, d: Peer, piece: int) -> None:
        if u.sending == (d, piece):
            return  # already on the wire: its bytes are wasted on arrival
        self.cancelled.add((u, d, piece))

    def deliver(self, d: Peer, u: Peer, piece: int, requested: float) -> None:
        if not d.alive or d.picker is None:
            return
        self.delivered += PIECE
        pipe = d.pipes.get(u)
        if pipe is not None:
            pipe.on_response(PIECE, self.now - requested, self.now)
        if d.picker.holds(piece):
            self.wasted += PIECE
            self.refill(d, u)
            return
        was_endgame = d.picker.in_endgame
        for other in d.picker.received(piece, u):
            assert isinstance(other, Peer)
            self.cancel(other, d, piece)
            other_pipe = d.pipes.get(other)
            if other_pipe is not None:
                other_pipe.on_cancel(PIECE, self.now)
        d.have[piece] = 1
        for nb in d.neighbors:
            picker = nb.picker
            if picker is None or picker.complete:
                continue
            picker.peer_has(d, piece)
            if picker.pickable(piece) or picker.in_endgame:
                self.refill(nb, d)
        if d.picker.complete:
            d.done_at = self.now
            d.pipes.clear()
            self.at(self.now + self.rng.expovariate(1 / self.c.linger), self.leave, d)
            return
        if d.picker.in_endgame and not was_endgame:
            for nb in list(d.neighbors):
                self.refill(d, nb)
        else:
            self.refill(d, u)


# -- experiments ------------------------------------------------------------------------------


def run(config: Config) -> Result:
    result = Swarm(config).run()
    ct = result.completion_times
    median = statistics.median(ct) if ct else float("nan")
    print(
        f"  peers={config.peers:5d} policy={config.policy.value:10s} seed={config.seed} "
        f"leave={config.seed_leaves_after}: completed {result.completed}/{result.downloaders} "
        f"median {median:.1f} s, seed x{result.seed_uploaded_ratio:.2f}, "
        f"extinct {result.extinct_share}, {result.events} events, {result.wall_seconds:.1f} s",
        flush=True,
    )
    return result


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_row(label: str, results: list[Result]) -> dict[str, Any]:
    times = [t for r in results for t in r.completion_times]
    finishers = sum(r.downloaders - r.aborted for r in results)
    return {
        "label": label,
        "runs": len(results),
        "downloaders": sum(r.downloaders for r in results),
        "completed_share": sum(r.completed for r in results) / max(1, finishers),
        "p10": quantile(times, 0.1),
        "median": quantile(times, 0.5),
        "p90": quantile(times, 0.9),
        "max": max(times, default=float("nan")),
        "seed_upload": statistics.mean(r.seed_uploaded_ratio for r in results),
        "wasted": statistics.mean(r.wasted_ratio for r in results),
        "wall": sum(r.wall_seconds for r in results),
    }


def completion_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | downloaders | completed | p10 | median | p90 | max | seed upload / content "
        "| wasted (endgame) | wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['downloaders']} | {100 * r['completed_share']:.0f}% "
            f"| {r['p10']:.1f} s | {r['median']:.1f} s | {r['p90']:.1f} s | {r['max']:.1f} s "
            f"| {r['seed_upload']:.2f} | {100 * r['wasted']:.2f}% | {r['wall']:.0f} s |"
        )
    return "\n".join(lines)


def plot_cdfs(path: Path, title: str, series: list[tuple[str, list[float], int]]) -> None:
    import matplotlib  # noqa: PLC0415 - optional, only for the figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, times, total in series:
        ordered = sorted(times)
        ys = [(i + 1) / total for i in range(len(ordered))]
        ax.step(ordered, ys, where="post", label=label)
    ax.set_xlabel("completion time after arrival (virtual s)")
    ax.set_ylabel("share of downloaders done")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_extinction(path: Path, table: dict[str, list[tuple[float, float, float]]]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for policy, points in table.items():
        xs = [x for x, _, _ in points]
        left.plot(xs, [100 * e for _, e, _ in points], marker="o", label=policy)
        right.plot(xs, [100 * c for _, _, c in points], marker="o", label=policy)
    left.set_xlabel("seed leaves after uploading (x content)")
    left.set_ylabel("pieces extinct when the seed leaves (%)")
    right.set_xlabel("seed leaves after uploading (x content)")
    right.set_ylabel("downloaders that complete (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("100 downloaders, seed leaves early")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:  # noqa: PLR0915 - one block per experiment
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pieces", type=int, default=128)
    parser.add_argument(
        "--runs", type=int, default=3, help="seeds per point (policies, extinction)"
    )
    parser.add_argument(
        "--experiments", default="scale,policies,endgame,extinction", help="comma-separated subset"
    )
    parser.add_argument("--scales", default="10,100,1000")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    chosen = set(args.experiments.split(","))
    started = time.perf_counter()
    output: dict[str, Any] = {"seed": args.seed, "pieces": args.pieces}
    tables: list[str] = []

    if "scale" in chosen:
        print("scale (rarest first, seed stays):")
        rows, series = [], []
        for n in [int(s) for s in args.scales.split(",")]:
            r = run(Config(peers=n, pieces=args.pieces, seed=args.seed))
            rows.append(summary_row(f"{n} downloaders", [r]))
            series.append((f"{n} downloaders", r.completion_times, r.downloaders))
        output["scale"] = rows
        tables.append("### Scale\n\n" + completion_table(rows))
        plot_cdfs(args.out / "completion_by_scale.png", "Rarest first, seed stays", series)

    if "policies" in chosen:
        print("policies (100 downloaders, seed stays):")
        rows, series = [], []
        for policy in PickPolicy:
            results = [
                run(Config(peers=100, pieces=args.pieces, policy=policy, seed=args.seed + k))
                for k in range(args.runs)
            ]
            rows.append(summary_row(policy.value, results))
            times = [t for r in results for t in r.completion_times]
            series.append((policy.value, times, sum(r.downloaders for r in results)))
        output["policies"] = rows
        tables.append("### Policies (100 downloaders)\n\n" + completion_table(rows))
        plot_cdfs(args.out / "completion_by_policy.png", "100 downloaders, seed stays", series)

    if "endgame" in chosen:
        print("endgame variants (100 downloaders, rarest first, seed stays):")
        rows = []
        for label, endgame, cap in (
            ("endgame, no cap", True, None),
            ("endgame, <= 2 requesters", True, 2),
            ("no endgame", False, None),
        ):
            results = [
                run(
                    Config(
                        peers=100,
                        pieces=args.pieces,
                        seed=args.seed + k,
                        endgame=endgame,
                        max_requesters=cap,
                    )
                )
                for k in range(args.runs)
            ]
            rows.append(summary_row(label, results))
        output["endgame"] = rows
        tables.append("### Endgame (100 downloaders)\n\n" + completion_table(rows))

    if "extinction" in chosen:
        print("extinction (100 downloaders, seed leaves early):")
        points: dict[str, list[tuple[float, float, float]]] = {}
        lines = [
            "| seed leaves after | " + " | ".join(p.value for p in PickPolicy) + " |",
            "|---:|" + "---:|" * len(PickPolicy),
        ]
        cells: dict[float, list[str]] = {}
        for policy in PickPolicy:
            for x in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
                results = [
                    run(
                        Config(
                            peers=100,
                            pieces=args.pieces,
                            policy=policy,
                            seed=args.seed + k,
                            seed_leaves_after=x,
                        )
                    )
                    for k in range(args.runs)
                ]
                extinct = statistics.mean(r.extinct_share or 0.0 for r in results)
                finishers = sum(r.downloaders - r.aborted for r in results)
                done = sum(r.completed for r in results) / max(1, finishers)
                points.setdefault(policy.value, []).append((x, extinct, done))
                cells.setdefault(x, []).append(f"{100 * extinct:.1f}% / {100 * done:.0f}%")
        for x, row in cells.items():
            lines.append(f"| {x:g}x content | " + " | ".join(row) + " |")
        output["extinction"] = points
        tables.append(
            "### Extinction (100 downloaders; extinct pieces / downloaders completing)\n\n"
            + "\n".join(lines)
        )
        plot_extinction(args.out / "extinction.png", points)

    output["wall_seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(output, indent=1, default=str) + "\n")
    print()
    print("\n\n".join(tables))
    print(f"\ntotal {output['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
