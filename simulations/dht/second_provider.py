"""A provider that looks its own key up: does it find the other providers?
``python simulations/dht/second_provider.py --nodes 1000 --keys 200 --ksize 4``

On the simulation's virtual-time network (simulate.py): for each key a first provider
announces; a share of the nodes vanishes (never either provider); a second provider
announces (to the key's nearest live nodes, some of which now hold only its own record) and
looks the key up, once counting records that name itself (the lookup before session 44:
the first answer naming anyone ended it) and once leaving them out (the daemon now). Prints
how many lookups found the first provider each way.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from p2pfs.discovery.dht.messages import dht_key
from simulations.dht.simulate import TTL, Simulation


def run(nodes: int, keys: int, ksize: int, churn: float, seed: int) -> tuple[int, int]:
    sim = Simulation(nodes=nodes, seed=seed, ksize=ksize, alpha=3, loss=0.0)
    loop = sim.loop
    try:
        loop.run_until_complete(sim.build(False))
        rng = random.Random(seed)
        pairs = []
        for _ in range(keys):
            key = dht_key(rng.randbytes(32))
            first, second = rng.sample(range(nodes), 2)
            ids = rng.randbytes(32), rng.randbytes(32)
            loop.run_until_complete(sim.nodes[first].announce(key, ids[0], 7000, round(TTL)))
            pairs.append((key, first, second, ids))
        providers = {index for _key, first, second, _ids in pairs for index in (first, second)}
        others = [index for index in range(nodes) if index not in providers]
        gone = rng.sample(others, round(churn * nodes))
        sim.network.down = {sim.addresses[index] for index in gone}
        for key, _first, second, ids in pairs:
            loop.run_until_complete(sim.nodes[second].announce(key, ids[1], 7001, round(TTL)))
        before = after = 0
        for key, _first, second, ids in pairs:
            for asker in (None, ids[1]):
                lookup = loop.run_until_complete(
                    sim.nodes[second].find_providers(key, 16, asker=asker)
                )
                found = any(provider.node_id == ids[0] for provider in lookup.providers)
                if asker is None:
                    before += found
                else:
                    after += found
        return before, after
    finally:
        sim.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--ksize", type=int, default=4)
    parser.add_argument("--churn", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print("| nodes | k | gone | found, own records counted | found, own records left out |")
    print("| --- | --- | --- | --- | --- |")
    for churn in args.churn:
        before, after = run(args.nodes, args.keys, args.ksize, churn, args.seed)
        print(
            f"| {args.nodes} | {args.ksize} | {churn:.0%} | {before} of {args.keys} "
            f"| {after} of {args.keys} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
