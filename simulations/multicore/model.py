"""Multi-core model: projected bulk throughput of a node against cores and peers, for today's
single-process daemon and for the worker-process design (SPEC.md, "Data plane workers").

    python simulations/multicore/model.py [--control-share 0.1] [--no-plot]

Inputs, measured on this machine and stored beside this file:

- ``measured.json``: CPU seconds per GiB of the sending and the receiving daemon in a
  loopback p2pfs fetch, and of the raw engine's bulk stream (sender and receiver), from the
  same run (``python -m benchmarks links --conditions direct --json``);
- ``handoff.json``: CPU seconds per GiB of handing payload from one process to another
  through a pipe and through shared memory (``handoff.py --save``);
- ``workers.json`` (once the workers were built, fetch side): the fetching daemon's own CPU
  and its workers' CPU per GiB, one peer in a worker, beside the same run's single-process
  fetcher (``from_bench.py`` over ``benchmarks swarm --only workers`` runs). It replaces
  the assumed control share with the measured one (main's share of the receiver's work)
  and adds the measured overhead of the split (workers + main over single process).

A node's throughput T (GiB/s) is the largest rate that meets every CPU constraint
(link rates are left out: this is about CPU). With per-GiB costs ``W`` in the workers and
``M`` in the main process, ``k`` worker processes, ``n`` connections and ``c`` cores:

- single process: ``T = 1 / cost`` (one interpreter; the GIL holds the whole data path on
  about one core whatever the number of peers, as the swarm bench shows today);
- workers: ``T = min(1 / M, min(n, k) / W, c / (W + M))``: main is one process, a
  connection lives in one worker (one core at most), and all of it shares ``c`` cores.

Designs: *as built* (the receiver's peers in workers, as measured; every sender a single
process, as the serving side is not split yet; no stripes), and two full-split variants:
*workers write* (a worker verifies and writes the chunks itself; only
control crosses to main, at ``control_share`` of today's cost per GiB), and *payload via
main* (the worker hands each verified payload to main, which writes it: shared-memory
hand-off on both sides plus the write path in main). A transfer between two nodes runs at the
lower of the sender's and the receiver's T; fetching from ``p`` peers, each sender serves
only us and has the same number of cores.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 1 << 30
MB = 1e6
WRITE_SHARE = 0.15
"""Share of the receiver's cost per GiB that is writing and fsync (the *payload via main*
variant keeps it in main); an assumption, see README.md."""


UNSTRIPED = ("single process", "as built (fetch side)")
"""Designs with one connection per peer (stripes are not built)."""


@dataclass(frozen=True, slots=True)
class WorkerCosts:
    """Measured with workers built (fetch side), CPU seconds per GiB of the fetching node."""

    main: float
    """The daemon's own process, its peer in a worker (control: picking, accounting, commits)."""
    worker: float
    single: float
    """The same run's fetcher without workers."""

    @property
    def control_share(self) -> float:
        return self.main / (self.main + self.worker)

    @property
    def overhead(self) -> float:
        """The split's cost: main + worker over the single process, per GiB."""
        return (self.main + self.worker) / self.single

    @classmethod
    def load(cls, directory: Path = HERE) -> WorkerCosts | None:
        path = directory / "workers.json"
        if not path.exists():
            return None
        measured = json.loads(path.read_text())
        on, off = measured["one-on"], measured["one-off"]
        return cls(
            main=on["fetcher_main_cpu_s_per_gib"],
            worker=on["fetcher_workers_cpu_s_per_gib"],
            single=off["fetcher_main_cpu_s_per_gib"],
        )


@dataclass(frozen=True, slots=True)
class Costs:
    """CPU seconds per GiB."""

    sender: float
    receiver: float
    raw_sender: float
    raw_receiver: float
    handoff_writer: float
    handoff_reader: float

    @classmethod
    def load(cls, directory: Path = HERE) -> Costs:
        measured = json.loads((directory / "measured.json").read_text())
        handoff = {row["kind"]: row for row in json.loads((directory / "handoff.json").read_text())}
        shm = handoff["shm"]
        return cls(
            sender=measured["p2pfs_sender_cpu_s_per_gib"],
            receiver=measured["p2pfs_receiver_cpu_s_per_gib"],
            raw_sender=measured["raw_sender_cpu_s_per_gib"],
            raw_receiver=measured["raw_receiver_cpu_s_per_gib"],
            handoff_writer=shm["writer_cpu_s_per_gib"],
            handoff_reader=shm["reader_cpu_s_per_gib"],
        )


def single_process(cost: float, cores: int) -> float:
    """GiB/s of one interpreter doing everything (``cores`` beyond one do not help)."""
    return 0.0 if cores < 1 else 1.0 / cost


def with_workers(worker: float, main: float, cores: int, connections: int) -> float:
    """GiB/s with one worker process per core, each connection owned by one worker."""
    workers = cores
    return min(1.0 / main, min(connections, workers) / worker, cores / (worker + main))


@dataclass(frozen=True, slots=True)
class Design:
    name: str
    control_share: float
    payload_via_main: bool = False
    overhead: float = 1.0
    """Workers + main over the single process, per GiB (measured once built)."""
    single_sender: bool = False
    """Only the fetching side is split (as built); senders are one process each."""

    def node_rate(
        self, cost: float, costs: Costs, cores: int, connections: int, side: str
    ) -> float:
        if self.name == "single process" or (self.single_sender and side == "sender"):
            return single_process(cost, cores)
        cost *= self.overhead
        control = self.control_share * cost
        if not self.payload_via_main:
            return with_workers(cost - control, control, cores, connections)
        # The receiver's worker hands the payload over (writer side of the hand-off) and main
        # takes it (reader side) and writes it; a sender's main reads the file and hands the
        # payload to the worker the other way round.
        moved = WRITE_SHARE * cost
        if side == "receiver":
            worker = cost - control - moved + costs.handoff_writer
            main = control + moved + costs.handoff_reader
        else:
            worker = cost - control - moved + costs.handoff_reader
            main = control + moved + costs.handoff_writer
        return with_workers(worker, main, cores, connections)

    def fetch_rate(self, costs: Costs, cores: int, peers: int, stripes: int) -> float:
        """GiB/s into one node fetching from ``peers`` senders (``stripes`` connections to
        each), every node with ``cores`` cores."""
        receiver = self.node_rate(costs.receiver, costs, cores, peers * stripes, "receiver")
        sender = self.node_rate(costs.sender, costs, cores, stripes, "sender")
        return min(receiver, peers * sender)


def raw_engine_rate(costs: Costs, cores: int, peers: int) -> float:
    """The raw engine's bulk streams with no p2pfs layer, one core each, as a reference: the
    ceiling the workers design approaches."""
    per_stream = 1.0 / max(costs.raw_sender, costs.raw_receiver)
    return min(cores / costs.raw_receiver, peers * per_stream, peers * cores / costs.raw_sender)


def table(costs: Costs, designs: list[Design], cores_list: list[int], peers_list: list[int]) -> str:
    lines = [
        f"inputs (CPU s/GiB): p2pfs sender {costs.sender:.2f}, receiver {costs.receiver:.2f}; "
        f"raw engine sender {costs.raw_sender:.2f}, receiver {costs.raw_receiver:.2f}; "
        f"shm hand-off {costs.handoff_writer:.3f} + {costs.handoff_reader:.3f}",
        f"{'design':<34}{'peers':>6}" + "".join(f"{c:>8} c" for c in cores_list) + "   (MB/s)",
    ]
    for design in designs:
        for peers in peers_list:
            for stripes in (1, 4) if design.name not in UNSTRIPED else (1,):
                label = design.name + ("" if stripes == 1 else f", {stripes} stripes")
                rates = [design.fetch_rate(costs, c, peers, stripes) * GiB / MB for c in cores_list]
                lines.append(f"{label:<34}{peers:>6}" + "".join(f"{r:>10.0f}" for r in rates))
    for peers in peers_list:
        rates = [raw_engine_rate(costs, c, peers) * GiB / MB for c in cores_list]
        lines.append(
            f"{'raw engine streams':<34}{peers:>6}" + "".join(f"{r:>10.0f}" for r in rates)
        )
    return "\n".join(lines)


def plot(costs: Costs, designs: list[Design], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - optional, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def mb_s(design: Design, cores: int, peers: int, stripes: int) -> float:
        return design.fetch_rate(costs, cores, peers, stripes) * GiB / MB

    colours = {"single process": "tab:red", "workers write": "tab:blue"}
    colours["payload via main"] = "tab:green"
    colours["as built (fetch side)"] = "tab:orange"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    cores_axis = list(range(1, 33))
    for design in designs:
        for peers, style in ((1, "-"), (4, "--"), (16, ":")):
            rates = [mb_s(design, c, peers, 1) for c in cores_axis]
            label = f"{design.name}, {peers} peer{'s' if peers > 1 else ''}"
            left.plot(cores_axis, rates, style, color=colours[design.name], label=label)
    # How much the main process's share of the work (an assumption) moves the ceiling.
    full = next(d for d in designs if d.name == "workers write")
    low = Design("workers write", 0.05, overhead=full.overhead)
    high = Design("workers write", 0.2, overhead=full.overhead)
    left.fill_between(
        cores_axis,
        [mb_s(high, c, 16, 1) for c in cores_axis],
        [mb_s(low, c, 16, 1) for c in cores_axis],
        color="tab:blue",
        alpha=0.12,
        label="workers write, 16 peers, main 5-20%",
    )
    raw = [raw_engine_rate(costs, c, 16) * GiB / MB for c in cores_axis]
    left.plot(cores_axis, raw, color="grey", linewidth=0.8, label="raw engine, 16 streams")
    left.set(
        xlabel="cores per node",
        ylabel="fetch throughput, MB/s (CPU ceiling)",
        title="Against cores, one connection per peer",
    )
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    peers_axis = list(range(1, 17))
    for design in designs:
        for stripes, marker in ((1, ""), (4, "o")):
            if design.name in UNSTRIPED and stripes > 1:
                continue
            rates = [mb_s(design, 16, p, stripes) for p in peers_axis]
            label = design.name + (f", {stripes} stripes a peer" if stripes > 1 else "")
            right.plot(
                peers_axis,
                rates,
                marker=marker,
                markersize=3,
                color=colours[design.name],
                linestyle="-" if stripes == 1 else "--",
                label=label,
            )
    right.set(
        xlabel="peers (senders, each with 16 cores)",
        ylabel="fetch throughput, MB/s (CPU ceiling)",
        title="Against peers, 16 cores per node",
    )
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--control-share",
        type=float,
        help="share of the per-GiB work that stays in main (default: measured, workers.json; "
        "0.1 without it)",
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    costs = Costs.load()
    measured = WorkerCosts.load()
    share = args.control_share
    if share is None:
        share = 0.1 if measured is None else measured.control_share
    overhead = 1.0 if measured is None else measured.overhead
    if measured is not None:
        print(
            f"measured (workers.json): main {measured.main:.2f} + worker {measured.worker:.2f} "
            f"CPU s/GiB vs single process {measured.single:.2f}: control share "
            f"{measured.control_share:.1%}, overhead {measured.overhead:.2f}x"
        )
    designs = [
        Design("single process", 1.0),
        Design("workers write", share, overhead=overhead),
        Design("payload via main", share, payload_via_main=True, overhead=overhead),
    ]
    if measured is not None:
        designs.insert(
            1, Design("as built (fetch side)", share, overhead=overhead, single_sender=True)
        )
    print(table(costs, designs, [1, 2, 4, 8, 16, 32], [1, 4, 16]))
    if not args.no_plot:
        try:
            plot(costs, designs, HERE / "throughput.png")
        except ImportError:
            print("matplotlib missing (pip install -e '.[sim]'): no plot")


if __name__ == "__main__":
    main()
