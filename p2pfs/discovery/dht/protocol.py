"""The ``kademlia`` package's protocol, extended with provider records and write tokens.

``DhtProtocol`` subclasses the package's ``KademliaProtocol`` so its routing table, k-buckets
and spider crawls run unchanged, and replaces the package's datagram handling (rpcudp) where
it trusted its input: every datagram goes through ``messages.datagram_untrusted`` before any
of it is used, requests are answered synchronously (no task per datagram, so junk cannot pile
up tasks or raise inside them), and a reply is accepted only from the address the request
went to, and only in the shape the method calls for.

Runs inside the DHT's own asyncio loop (see ``finder.py``); nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kademlia.node import Node  # type: ignore[import-untyped]
from kademlia.protocol import KademliaProtocol  # type: ignore[import-untyped]
from kademlia.routing import RoutingTable  # type: ignore[import-untyped]

from p2pfs.discovery.dht.messages import (
    MAX_CONTACTS,
    MAX_DATAGRAM,
    MAX_PROVIDERS_PER_RESPONSE,
    MSG_ID_LEN,
    DhtMessageError,
    ProviderInfo,
    Request,
    Response,
    add_provider_reply_untrusted,
    contacts_untrusted,
    datagram_untrusted,
    encode_request,
    encode_response,
    ip_untrusted,
    ping_reply_untrusted,
    providers_reply_untrusted,
)
from p2pfs.discovery.dht.records import RecordStore
from p2pfs.discovery.dht.tokens import SECRET_LEN, WriteTokens
from p2pfs.errors import LocalProtocolError

logger = logging.getLogger(__name__)

Address = tuple[str, int]
CallResult = tuple[bool, Any]
"""The package's convention: (responded, validated reply or None)."""


@dataclass
class Traffic:
    """Datagram counters of one node, for benchmarks and the simulation."""

    sent: int = 0
    sent_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    dropped: int = 0
    refused_announces: int = 0
    by_method: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[CallResult]
    timer: asyncio.TimerHandle
    address: Address
    parse: Callable[[object], Any]


class ExactRoutingTable(RoutingTable):  # type: ignore[misc]
    """The package's routing table with an exact ``find_neighbors``.

    The package walks buckets outward from the target's with ``TableTraverser``, which stops
    as soon as the buckets on one side run out even when the other side still has nodes: for
    keys in the top bucket range it can return nothing from a non-empty table (measured in
    the simulation: 5% of lookups failed at 0% churn). The k nearest of a few hundred
    contacts by XOR distance is cheap and is what Kademlia specifies.
    """

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        target = node.long_id
        candidates = [
            contact
            for bucket in self.buckets
            for contact in bucket.nodes.values()
            if contact.id != node.id and (exclude is None or not contact.same_home_as(exclude))
        ]
        return heapq.nsmallest(k or self.ksize, candidates, key=lambda c: c.long_id ^ target)


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]
    def __init__(
        self,
        source_node: Node,
        *,
        ksize: int,
        rpc_timeout: float,
        records: RecordStore,
        clock: Callable[[], float],
        random_bytes: Callable[[int], bytes],
    ) -> None:
        if not 0 < ksize <= MAX_CONTACTS:
            raise ValueError(f"ksize must be in [1, {MAX_CONTACTS}]")
        super().__init__(source_node, None, ksize)
        self.router = ExactRoutingTable(self, ksize, source_node)
        self.ksize = ksize
        self.rpc_timeout = rpc_timeout
        self.records = records
        self.clock = clock
        self.random_bytes = random_bytes
        self.tokens = WriteTokens(secret=random_bytes(SECRET_LEN), now=clock())
        self.traffic = Traffic()
        self._pending: dict[bytes, _Pending] = {}
        self._expiry_timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns every unknown attribute into a remote call; a typo must fail loudly.
        raise AttributeError(name)

    # ---- receiving ------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.traffic.received += 1
        self.traffic.received_bytes += len(data)
        try:
            message = datagram_untrusted(data)
            sender = (ip_untrusted(addr[0]), int(addr[1]))
        except DhtMessageError as exc:
            self.traffic.dropped += 1
            logger.debug("dropping %d-byte datagram from %s: %s", len(data), addr, exc)
            return
        if isinstance(message, Response):
            self._accept_reply(message, sender)
        else:
            self._answer(message, sender)

    def error_received(self, exc: Exception) -> None:
        logger.debug("DHT socket error: %s", exc)

    def _accept_reply(self, message: Response, sender: Address) -> None:
        pending = self._pending.get(message.msg_id)
        if pending is None or pending.address != sender:
            self.traffic.dropped += 1
            logger.debug("dropping unexpected reply from %s", sender)
            return
        del self._pending[message.msg_id]
        pending.timer.cancel()
        try:
            result: CallResult = (True, pending.parse(message.payload))
        except DhtMessageError as exc:
            self.traffic.dropped += 1
            logger.debug("malformed reply from %s: %s", sender, exc)
            result = (False, None)
        if not pending.future.done():
            pending.future.set_result(result)

    def _answer(self, request: Request, sender: Address) -> None:
        handler = getattr(self, f"rpc_{request.method}")
        payload = handler(sender, *request.args)
        self._send(encode_response(request.msg_id, payload), sender)

    def _send(self, data: bytes, address: Address) -> None:
        self.traffic.sent += 1
        self.traffic.sent_bytes += len(data)
        self.transport.sendto(data, address)

    # ---- served methods -------------------------------------------------------------------

    def welcome_if_new(self, node: Node) -> None:
        # The package also pushes its stored values to newcomers; provider records are not
        # replicated (their providers re-announce to whoever is closest then, as in BEP 5).
        if self.router.is_new_node(node):
            self.router.add_contact(node)

    def _contacts_near(self, key: bytes, exclude: Node | None) -> list[list[Any]]:
        neighbors = self.router.find_neighbors(Node(key), self.ksize, exclude=exclude)
        return [[n.id, n.ip, n.port] for n in neighbors]

    def rpc_ping(self, sender: Address, nodeid: bytes) -> bytes:
        self.welcome_if_new(Node(nodeid, *sender))
        return bytes(self.source_node.id)

    def rpc_find_node(self, sender: Address, nodeid: bytes, key: bytes) -> list[list[Any]]:
        source = Node(nodeid, *sender)
        self.welcome_if_new(source)
        return self._contacts_near(key, source)

    def rpc_get_providers(self, sender: Address, nodeid: bytes, key: bytes) -> dict[str, Any]:
        source = Node(nodeid, *sender)
        self.welcome_if_new(source)
        now = self._now()
        records = self.records.get(key, now, MAX_PROVIDERS_PER_RESPONSE)
        providers = [
            ProviderInfo(r.node_id, r.ip, r.port, max(0, math.ceil(r.expires - now)))
            for r in records
        ]
        nodes = self._contacts_near(key, source)
        reply = {"token": self.tokens.issue(*sender), "nodes": nodes, "providers": []}
        reply["providers"] = [p.to_wire() for p in providers]
        # IPv6 addresses make the worst case larger than a datagram: trim providers to fit.
        while len(encode_response(bytes(MSG_ID_LEN), reply)) > MAX_DATAGRAM:
            reply["providers"] = reply["providers"][: len(reply["providers"]) // 2]
        return reply

    def rpc_add_provider(
        self,
        sender: Address,
        nodeid: bytes,
        key: bytes,
        token: bytes,
        provider_id: bytes,
        port: int,
        ttl: int,
    ) -> bool:
        self._now()
        if not self.tokens.verify(token, *sender):
            self.traffic.refused_announces += 1
            logger.debug("refusing announce from %s: bad token", sender)
            return False
        self.welcome_if_new(Node(nodeid, *sender))
        # The record's IP is always the sender's: the token proved it can receive there.
        self.records.add(key, provider_id, sender[0], port, ttl, self._now())
        self._arm_expiry()
        return True

    def _arm_expiry(self) -> None:
        """One timer at the next record expiry, so expired records go without any traffic."""
        deadline = self.records.next_expiry()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, deadline - self.clock())
        if self._expiry_timer is not None:
            if self._expiry_timer.when() <= when:
                return
            self._expiry_timer.cancel()
        self._expiry_timer = loop.call_at(when, self._on_expiry_timer)

    def _on_expiry_timer(self) -> None:
        self._expiry_timer = None
        self.records.expire(self.clock())
        self._arm_expiry()

    def _now(self) -> float:
        now = self.clock()
        if self.tokens.needs_rotation(now):
            self.tokens.rotate(self.random_bytes(SECRET_LEN), now)
        self.records.expire(now)
        return now

    # ---- calling --------------------------------------------------------------------------

    def _call(
        self, address: Address, method: str, args: list[Any], parse: Callable[[object], Any]
    ) -> asyncio.Future[CallResult]:
        loop = asyncio.get_running_loop()
        msg_id = self.random_bytes(MSG_ID_LEN)
        future: asyncio.Future[CallResult] = loop.create_future()
        timer = loop.call_later(self.rpc_timeout, self._expire_call, msg_id)
        self._pending[msg_id] = _Pending(future, timer, address, parse)
        self.traffic.by_method[method] = self.traffic.by_method.get(method, 0) + 1
        self._send(encode_request(msg_id, method, args), address)
        return future

    def _expire_call(self, msg_id: bytes) -> None:
        pending = self._pending.pop(msg_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result((False, None))

    def cancel_calls(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        for pending in self._pending.values():
            pending.timer.cancel()
            if not pending.future.done():
                pending.future.set_result((False, None))
        self._pending.clear()

    async def _ask(
        self, node: Node, method: str, args: list[Any], parse: Callable[[object], Any]
    ) -> CallResult:
        result = await self._call((node.ip, node.port), method, args, parse)
        self.handle_call_response(result, node)  # the package's routing-table upkeep
        return result

    async def call_ping(self, node_to_ask: Node) -> CallResult:
        return await self._ask(node_to_ask, "ping", [self.source_node.id], ping_reply_untrusted)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> CallResult:
        ok, contacts = await self._ask(
            node_to_ask, "find_node", [self.source_node.id, node_to_find.id], contacts_untrusted
        )
        # The package's crawlers build Node(*contact) from these tuples.
        return ok, [(c.id, c.ip, c.port) for c in contacts] if ok else None

    async def call_get_providers(self, node_to_ask: Node, key: bytes) -> CallResult:
        result: CallResult = await self._ask(
            node_to_ask, "get_providers", [self.source_node.id, key], providers_reply_untrusted
        )
        return result

    async def call_add_provider(
        self, node_to_ask: Node, key: bytes, token: bytes, provider_id: bytes, port: int, ttl: int
    ) -> CallResult:
        args = [self.source_node.id, key, token, provider_id, port, ttl]
        result: CallResult = await self._ask(
            node_to_ask, "add_provider", args, add_provider_reply_untrusted
        )
        return result

    async def call_ping_address(self, address: Address) -> CallResult:
        """A ping to an address whose node id we do not know yet (bootstrap)."""
        return await self._call(address, "ping", [self.source_node.id], ping_reply_untrusted)

    async def call_store(self, *args: object) -> CallResult:
        """The package's value store is not served: the p2pfs DHT holds provider records only,
        so calling this is our own misuse."""
        raise LocalProtocolError("the p2pfs DHT stores provider records only")

    async def call_find_value(self, *args: object) -> CallResult:
        raise LocalProtocolError("the p2pfs DHT stores provider records only")
