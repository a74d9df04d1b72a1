"""Hostile requests to a real private-DHT node over UDP on loopback (issue 12 item 13).

Sources are raw sockets bound to addresses across 127/8 (all loopback), so each looks like a
different host, or a different /24, to the node. A source that never echoes a token is what a
forged source address looks like to the node: it cannot see the replies sent there.

Bounds checked:
- reflection: a reply to a requester without a valid token is at most ``AMPLIFICATION`` (3)
  times its request, per datagram and in total, for get_providers and find_node alike, while a
  requester that echoes its token gets the whole reply (32 providers, 20 nodes);
- rate limits: with the node's clock held still (no refill), a flooding source gets exactly its
  bucket's burst answered, its /24 neighbours then share what is left of the /24's burst, other
  /24s are answered until the global burst is spent; once the clock moves, the buckets refill;
- honest lookups through a real ``DhtFinder`` still find the providers.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import msgpack
import pytest
import trio

from p2pfs.address import PeerAddress
from p2pfs.discovery.dht.finder import DhtFinder
from p2pfs.discovery.dht.messages import (
    AMPLIFICATION,
    MAX_PROVIDERS_PER_RESPONSE,
    dht_key,
    encode_request,
    providers_reply_untrusted,
)
from p2pfs.discovery.dht.ratelimit import Rate, RequestLimits

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def serving(**options: object) -> AsyncIterator[DhtFinder]:
    finder = DhtFinder(
        node_id=os.urandom(32),
        quic_port=9000,
        host="127.0.0.1",
        rpc_timeout=0.3,
        **options,  # type: ignore[arg-type]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(finder.serve)
        yield finder
        nursery.cancel_scope.cancel()


async def _udp(ip: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((ip, 0))
    return sock


async def _exchange(
    sock: trio.socket.SocketType, target: tuple[str, int], method: str, args: list[object]
) -> tuple[int, bytes]:
    """One request; (its size, the raw reply datagram)."""
    msg_id = os.urandom(20)
    request = encode_request(msg_id, method, args)
    await sock.sendto(request, target)
    with trio.fail_after(5):
        while True:
            data, _ = await sock.recvfrom(65536)
            if data[1:21] == msg_id:
                return len(request), data


async def _announce_from(ip: str, target: tuple[str, int], key: bytes, ttl: int) -> bytes:
    """A provider at ``ip`` announces ``key`` the honest way; returns its provider node id."""
    provider_id, sender_id = os.urandom(32), os.urandom(20)
    with await _udp(ip) as sock:
        _, raw = await _exchange(sock, target, "get_providers", [sender_id, key])
        token = providers_reply_untrusted(msgpack.unpackb(raw[21:])).token
        args = [sender_id, key, token, provider_id, 4000, ttl]
        _, raw = await _exchange(sock, target, "add_provider", args)
        assert msgpack.unpackb(raw[21:]) is True
    return provider_id


def test_unverified_replies_stay_within_the_amplification_bound() -> None:
    async def main() -> None:
        async with serving() as victim:
            target = ("127.0.0.1", victim.port)
            key = dht_key(os.urandom(32))
            # 32 providers from 32 different /24s: the largest provider list a reply carries;
            # their requests also fill the node's routing table past k = 20.
            for n in range(MAX_PROVIDERS_PER_RESPONSE):
                await _announce_from(f"127.0.{n + 1}.2", target, key, 1800)
            assert victim.contacts() >= 20

            before = (victim.traffic.received_bytes, victim.traffic.sent_bytes)
            sizes: list[tuple[str, int, int]] = []
            for n in range(40):
                with await _udp(f"127.1.{n}.9") as sock:
                    asker = os.urandom(20)
                    forged = os.urandom(16)  # a token that this address was never given
                    requests: list[tuple[str, list[object]]] = [
                        ("get_providers", [asker, key]),
                        ("get_providers", [asker, key, forged]),
                        ("find_node", [asker, key]),
                    ]
                    for method, args in requests:
                        size, reply = await _exchange(sock, target, method, args)
                        sizes.append((method, size, len(reply)))
            received = victim.traffic.received_bytes - before[0]
            sent = victim.traffic.sent_bytes - before[1]
            for method, size, reply_size in sizes:
                assert reply_size <= AMPLIFICATION * size, (method, size, reply_size)
            assert sent <= AMPLIFICATION * received
            assert victim.traffic.truncated >= 3 * 40

            # Echoing the token this address was given proves it receives here: whole reply.
            with await _udp("127.2.0.9") as sock:
                asker = os.urandom(20)
                bare, raw = await _exchange(sock, target, "get_providers", [asker, key])
                first = providers_reply_untrusted(msgpack.unpackb(raw[21:]))
                assert first.truncated
                args = [asker, key, first.token]
                _, raw = await _exchange(sock, target, "get_providers", args)
                full = providers_reply_untrusted(msgpack.unpackb(raw[21:]))
                assert not full.truncated
                assert len(full.providers) == MAX_PROVIDERS_PER_RESPONSE
                assert len(full.nodes) == 20
                # What any source got for a bare request before the bound (the issue: 32x).
                assert len(raw) > 25 * bare

            # An honest lookup through a real node: one extra round trip, all it asks for.
            async with serving(bootstrap=[PeerAddress("127.0.0.1", victim.port)]) as seeker:
                found = await seeker._call(lambda node: node.find_providers(key, 32))
                assert len(found.providers) == MAX_PROVIDERS_PER_RESPONSE

    trio.run(main)


class Flood:
    """Raw sockets that send requests to one node and count the replies each receives."""

    def __init__(self, target: tuple[str, int], nursery: trio.Nursery, stack: AsyncExitStack):
        self.target = target
        self.nursery = nursery
        self.stack = stack
        self.replies: Counter[str] = Counter()
        self.sent = 0

    async def send(self, ip: str, count: int) -> None:
        sock = await _udp(ip)
        self.stack.enter_context(sock)
        self.nursery.start_soon(self._count, ip, sock)
        for n in range(count):
            request = encode_request(os.urandom(20), "get_providers", [b"a" * 20, b"k" * 20])
            await sock.sendto(request, self.target)
            self.sent += 1
            if n % 20 == 19:
                await trio.sleep(0.005)  # stay within the node's socket receive buffer

    async def _count(self, ip: str, sock: trio.socket.SocketType) -> None:
        while True:
            await sock.recv(65536)
            self.replies[ip] += 1

    async def settle(self, victim: DhtFinder) -> None:
        """Wait until the node has read every request and we hold every reply it sent."""
        with trio.fail_after(10):
            while victim.traffic.received < self.sent:
                await trio.sleep(0.01)
            answered = self.sent - victim.traffic.rate_limited
            while sum(self.replies.values()) < answered:
                await trio.sleep(0.01)


def test_a_flooding_source_is_limited_and_others_are_still_answered() -> None:
    now = [1000.0]
    limits = RequestLimits(per_ip=Rate(1.0, 20), per_prefix=Rate(1.0, 50), total=Rate(1.0, 200))

    async def main() -> None:
        async with (
            serving(clock=lambda: now[0], limits=limits) as victim,
            AsyncExitStack() as stack,
            trio.open_nursery() as nursery,
        ):
            flood = Flood(("127.0.0.1", victim.port), nursery, stack)
            # One source floods: its burst is answered, the rest dropped unread.
            await flood.send("127.0.0.5", 100)
            await flood.settle(victim)
            assert flood.replies["127.0.0.5"] == 20
            assert victim.traffic.rate_limited == 80
            # Its /24 neighbours are still answered, until the /24's burst (50) is spent.
            await flood.send("127.0.0.6", 100)
            await flood.send("127.0.0.7", 100)
            await flood.send("127.0.0.8", 10)
            await flood.settle(victim)
            assert [flood.replies[f"127.0.0.{n}"] for n in (6, 7, 8)] == [20, 10, 0]
            # Other /24s still are, until the global burst (200) is spent.
            for n in range(1, 8):
                await flood.send(f"127.0.{n}.1", 30)
            await flood.settle(victim)
            assert [flood.replies[f"127.0.{n}.1"] for n in range(1, 8)] == [20] * 7
            await flood.send("127.0.8.1", 30)
            await flood.send("127.0.9.1", 5)
            await flood.settle(victim)
            assert flood.replies["127.0.8.1"] == 10
            assert flood.replies["127.0.9.1"] == 0
            assert sum(flood.replies.values()) == 200
            # Time refills the buckets: ten seconds later each bucket holds ten more.
            now[0] += 10.0
            await flood.send("127.0.0.5", 30)
            await flood.send("127.0.9.1", 30)
            await flood.settle(victim)
            assert flood.replies["127.0.0.5"] == 30
            assert flood.replies["127.0.9.1"] == 0  # the global bucket's ten went to .0.5
            nursery.cancel_scope.cancel()

    trio.run(main)
