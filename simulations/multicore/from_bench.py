"""Measured worker costs for the model, from ``benchmarks swarm --only workers --json`` runs.

    python -m benchmarks swarm --only workers --json > run1.json   # (under the heavy lock)
    python simulations/multicore/from_bench.py run1.json run2.json ... --save

Per run and per fetch (1 seeder, 3 seeders; workers off, on): the fetching daemon's own CPU
(main) and its workers' CPU per GiB, the seeders' CPU per GiB, the rate; the medians over
runs go to ``workers.json``, which model.py reads. ``cpu_bound_mb_s``: the rate this
machine's cores allow when every process of the run (seeders, fetcher, workers, CLI) needs
that much CPU per GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 1 << 30

FETCHES = ("one-off", "three-off", "one-on", "three-on")
CORES = os.cpu_count() or 1


def per_fetch(figures: dict[str, object], name: str) -> dict[str, float]:
    run = figures[name]
    assert isinstance(run, dict)
    gib = float(run["bytes"]) / GiB
    main = float(run["fetcher_main_cpu"]) / gib
    total = (float(run["fetcher_cpu"]) + float(run["seeders_cpu"]) + float(run["cli_cpu"])) / gib
    return {
        "mb_per_s": float(run["mb_per_s"]),
        # Every process of the run shares this machine's cores: the rate they allow at most.
        "cpu_bound_mb_s": CORES / total * GiB / 1e6,
        "fetcher_main_cpu_s_per_gib": main,
        "fetcher_workers_cpu_s_per_gib": float(run["fetcher_cpu"]) / gib - main,
        "seeders_cpu_s_per_gib": float(run["seeders_cpu"]) / gib,
        "cli_cpu_s_per_gib": float(run["cli_cpu"]) / gib,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--save", action="store_true", help="write workers.json")
    args = parser.parse_args(argv)
    loaded = [json.loads(path.read_text())["figures"] for path in args.runs]
    result: dict[str, object] = {"runs": len(loaded), "bytes": loaded[0]["bytes"]}
    for name in FETCHES:
        rows = [per_fetch(figures, name) for figures in loaded]
        result[name] = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        result[name + "_runs_mb_s"] = [round(row["mb_per_s"], 1) for row in rows]
    result["loads"] = [f"{f['load_before']} -> {f['load_after']}" for f in loaded]
    text = json.dumps(result, indent=2)
    print(text)
    if args.save:
        (HERE / "workers.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
