"""The provider crawl: an iterative get_providers lookup that does not wait on the dead.

The ``kademlia`` package's crawl goes in rounds: it asks alpha nodes and waits for all of
them, so one node that vanished holds the whole round for the full RPC timeout (2 s), and a
lookup that meets a dead node in each of three rounds takes 6 s. This crawl keeps alpha
queries *in flight* instead, as libtorrent's traversal does: when one answers, the next
nearest node not yet asked is asked at once, and a query unanswered after ``slow_after``
stops holding a slot (its answer is still used if it comes), so a dead node costs a lookup
``slow_after``, not the RPC timeout.

An announce's crawl ends when the k nearest nodes it knows have all been asked and
answered or timed out. A lookup (``stop_on_found``) ends as soon as an answer names
providers other than the asker itself (a node that provides the key too and looks for the
others: nodes that stored only its own announce know no one else, and ending there found
nothing); failing that, it goes on to the 2k nearest, since after churn the nodes that
hold the record may sit just behind dead ones that other tables still name (at k=4 and 50%
churn in ``simulations/dht``, the 2k window found 91.5% against 88.8% with k).

A node that timed out stays out of the crawl: other nodes' tables still name it,
and let back in it would hold one of the k nearest places and end the crawl before the live
nodes behind it are asked.

Runs on the DHT's asyncio loop (``finder.py``) or the simulation's virtual-time loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from kademlia.node import Node, NodeHeap  # type: ignore[import-untyped]

from p2pfs.discovery.dht.messages import ProviderInfo, ProvidersReply
from p2pfs.discovery.dht.protocol import CallResult, DhtProtocol

SLOW_AFTER = 0.5
"""Seconds after which an unanswered query no longer holds one of the alpha slots. Replies
on the real internet come within a few hundred ms (BEP 5 nodes answer from memory); a node
that has not answered by then has more likely gone than slowed."""


@dataclass(slots=True)
class _Query:
    node: Node
    depth: int
    started: float
    task: asyncio.Future[CallResult] = field(repr=False)


class ProviderCrawl:
    """One get_providers crawl towards ``target`` from ``seeds`` (nearest first or not).

    After ``find()``: ``providers`` found, ``tokens`` of the nodes that answered (an
    announce stores its record with them), ``rounds`` (the lookup's hops: the depth of the
    answer that named providers, else of the deepest answer) and ``queried``.
    """

    def __init__(
        self,
        protocol: DhtProtocol,
        target: Node,
        seeds: list[Node],
        ksize: int,
        alpha: int,
        *,
        stop_on_found: bool,
        slow_after: float = SLOW_AFTER,
        asker: bytes | None = None,
    ) -> None:
        """``asker``: our own provider id, whose records are left out."""
        self.protocol = protocol
        self.target = target
        self.alpha = alpha
        self.stop_on_found = stop_on_found
        self.asker = asker
        self.slow_after = slow_after
        self.nearest = NodeHeap(target, ksize * 2 if stop_on_found else ksize)
        self.nearest.push(list(seeds))
        self._depth: dict[bytes, int] = {seed.id: 1 for seed in seeds}
        self.failed: set[bytes] = set()
        self.tokens: dict[bytes, bytes] = {}
        self.providers: dict[tuple[str, int], ProviderInfo] = {}
        self.rounds = 0
        self.queried = 0
        self._found_at = 0

    async def find(self) -> None:
        loop = asyncio.get_running_loop()
        waiting: list[_Query] = []
        while True:
            now = loop.time()
            fast = sum(1 for query in waiting if now - query.started < self.slow_after)
            for node in self.nearest.get_uncontacted():
                if fast >= self.alpha:
                    break
                waiting.append(self._ask(node, now))
                fast += 1
            # Done once nothing among the k nearest is left to ask or wait for. Queries to
            # nodes pushed out of the k nearest are still awaited while the crawl goes on: a
            # timeout there takes the node out for good, which matters if nearer nodes fail
            # and it comes back into the k nearest.
            if not waiting:
                break
            turns_slow = [
                query.started + self.slow_after
                for query in waiting
                if query.started + self.slow_after > now
            ]
            timeout = min(turns_slow) - now if turns_slow else None
            done, _ = await asyncio.wait(
                [query.task for query in waiting],
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for query in [query for query in waiting if query.task in done]:
                waiting.remove(query)
                self._answered(query, query.task.result())
            if self.stop_on_found and self.providers:
                break
        self.rounds = self._found_at or self.rounds

    def _ask(self, node: Node, now: float) -> _Query:
        self.nearest.mark_contacted(node)
        self.queried += 1
        task = asyncio.ensure_future(self.protocol.call_get_providers(node, self.target.id))
        return _Query(node, self._depth.get(node.id, 1), now, task)

    def _answered(self, query: _Query, result: CallResult) -> None:
        ok, reply = result
        if not ok:
            self.nearest.remove([query.node.id])
            self.failed.add(query.node.id)
            return
        assert isinstance(reply, ProvidersReply)
        self.rounds = max(self.rounds, query.depth)
        self.tokens[query.node.id] = reply.token
        others = [provider for provider in reply.providers if provider.node_id != self.asker]
        for provider in others:
            self.providers.setdefault((provider.ip, provider.port), provider)
        if others and not self._found_at:
            self._found_at = query.depth
        learned = [
            Node(contact.id, contact.ip, contact.port)
            for contact in reply.nodes
            if contact.id not in self.failed
        ]
        for node in learned:
            self._depth.setdefault(node.id, query.depth + 1)
        self.nearest.push(learned)

    def closest_with_tokens(self) -> list[tuple[Node, bytes]]:
        return [(node, self.tokens[node.id]) for node in self.nearest if node.id in self.tokens]
