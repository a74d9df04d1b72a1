"""``python -m benchmarks SUITE [options]``; ``--help`` after a suite lists its options."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "api": "benchmarks.api",
    "bigfolder": "benchmarks.bigfolder",
    "dht": "benchmarks.dht",
    "dial": "benchmarks.dial",
    "fetch": "benchmarks.fetch",
    "fuzz": "benchmarks.fuzz",
    "index": "benchmarks.index",
    "links": "benchmarks.links",
    "nat": "benchmarks.nat",
    "placers": "benchmarks.placers",
    "swarm": "benchmarks.swarm",
    "sync": "benchmarks.sync",
    "transport": "benchmarks.transport",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUITES:
        print(f"usage: python -m benchmarks {{{','.join(SUITES)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(SUITES[argv[0]])
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    raise SystemExit(main())
