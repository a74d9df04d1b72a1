"""``python -m p2pfs.bench SUITE [options]``; ``--help`` after a suite lists its options."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "api": "p2pfs.bench.api",
    "bigfolder": "p2pfs.bench.bigfolder",
    "dht": "p2pfs.bench.dht",
    "dial": "p2pfs.bench.dial",
    "fetch": "p2pfs.bench.fetch",
    "fuzz": "p2pfs.bench.fuzz",
    "index": "p2pfs.bench.index",
    "nat": "p2pfs.bench.nat",
    "swarm": "p2pfs.bench.swarm",
    "sync": "p2pfs.bench.sync",
    "transport": "p2pfs.bench.transport",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUITES:
        print(f"usage: python -m p2pfs.bench {{{','.join(SUITES)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(SUITES[argv[0]])
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    raise SystemExit(main())
