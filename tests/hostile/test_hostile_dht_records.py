"""Provider-record poisoning of a real private-DHT node over loopback UDP (issue 12 item 13).

The issue: records announced with a longer TTL from 8 addresses (or one IPv6 /64) pushed honest
ones out of a key and were returned first. Bounds checked here:
- a TTL above 30 min is stored as 30 min;
- 8 addresses of one /24 and 8 addresses in 8 /24s, each announcing 8 ports with the largest TTL
  the wire allows, twice over, leave every honest record in place, returned ahead of theirs;
  an honest provider arriving after the key is full gets in;
- one IPv6 /64 (checked on the record store and the limiter, since loopback IPv6 is only ::1)
  holds at most 16 records of a key and shares one rate-limit bucket.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio
from kademlia.node import Node  # type: ignore[import-untyped]

from p2pfs.address import PeerAddress
from p2pfs.discovery.dht.finder import DhtFinder
from p2pfs.discovery.dht.messages import (
    MAX_PROVIDERS_PER_RESPONSE,
    MAX_TTL,
    ProvidersReply,
    dht_key,
    encode_request,
    providers_reply_untrusted,
)
from p2pfs.discovery.dht.ratelimit import Rate, RequestLimiter, RequestLimits
from p2pfs.discovery.dht.records import DEFAULT_MAX_TTL, RecordStore

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def serving(host: str, bootstrap: Sequence[int] = ()) -> AsyncIterator[DhtFinder]:
    finder = DhtFinder(
        node_id=os.urandom(32),
        quic_port=9000,
        host=host,
        bootstrap=[PeerAddress("127.0.0.1", port) for port in bootstrap],
        rpc_timeout=0.3,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(finder.serve)
        yield finder
        nursery.cancel_scope.cancel()


async def _exchange(
    sock: trio.socket.SocketType, target: tuple[str, int], method: str, args: list[object]
) -> object:
    msg_id = os.urandom(20)
    await sock.sendto(encode_request(msg_id, method, args), target)
    with trio.fail_after(5):
        while True:
            data, _ = await sock.recvfrom(65536)
            if data[1:21] == msg_id:
                return msgpack.unpackb(data[21:])


async def _attack_from(ip: str, target: tuple[str, int], key: bytes, ports: range) -> int:
    """``ip`` announces ``key`` on every port in ``ports`` with the longest TTL the wire
    allows; returns how many announces the node accepted."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind((ip, 0))
        sender = os.urandom(20)
        reply = providers_reply_untrusted(
            await _exchange(sock, target, "get_providers", [sender, key])
        )
        accepted = 0
        for port in ports:
            args = [sender, key, reply.token, os.urandom(32), port, MAX_TTL]
            accepted += await _exchange(sock, target, "add_provider", args) is True
        return accepted


ATTACKERS = [f"127.0.7.{n}" for n in range(1, 9)] + [f"127.0.{n}.1" for n in range(10, 18)]
"""8 addresses of one /24, and 8 addresses in 8 /24s."""


def test_long_ttls_from_many_addresses_cannot_push_out_honest_records() -> None:
    async def main() -> None:
        async with serving("127.0.0.1") as victim:
            target = ("127.0.0.1", victim.port)
            discovery_key = os.urandom(32)
            key = dht_key(discovery_key)
            records = victim._node.protocol.records
            async with (
                serving("127.0.100.1", [victim.port]) as honest_a,
                serving("127.0.101.1", [victim.port]) as honest_b,
                serving("127.0.102.1", [victim.port]) as seeker,
            ):
                await honest_a.announce(discovery_key)
                await honest_b.announce(discovery_key)
                honest = {honest_a.node_id, honest_b.node_id}
                # Two rounds, with fresh ports the second time, so every attacker record is
                # newer than the honest ones: all accepted, none may displace them.
                for ports in (range(1000, 1008), range(2000, 2008)):
                    for ip in ATTACKERS:
                        assert await _attack_from(ip, target, key, ports) == 8
                stored = records.get(key, 0.0, 1000)
                assert len(stored) == records.per_key == 64
                assert honest <= {r.node_id for r in stored}
                # (a float sum on the monotonic clock: within a microsecond)
                assert all(r.expires - r.announced <= DEFAULT_MAX_TTL + 1e-6 for r in stored)
                assert sum(r.ip.startswith("127.0.7.") for r in stored) <= records.per_prefix
                # Returned ahead of the attackers', to a real node's client as well (which
                # echoes the token for the whole reply).
                assert {r.node_id for r in stored[:2]} == honest
                asked = Node(victim._node.node.id, "127.0.0.1", victim.port)

                async def ask_victim() -> ProvidersReply:
                    ok, reply = await seeker._call(
                        lambda node: node.protocol.call_get_providers(asked, key)
                    )
                    assert ok and isinstance(reply, ProvidersReply) and not reply.truncated
                    assert len(reply.providers) == MAX_PROVIDERS_PER_RESPONSE
                    return reply

                reply = await ask_victim()
                assert {p.node_id for p in reply.providers[:2]} == honest
                # An honest provider that comes after the key is full still gets in.
                async with serving("127.0.103.1", [victim.port]) as late:
                    await late.announce(discovery_key)
                    stored = records.get(key, 0.0, 1000)
                    assert honest | {late.node_id} <= {r.node_id for r in stored}
                    reply = await ask_victim()
                    assert {p.node_id for p in reply.providers[:3]} == honest | {late.node_id}

    trio.run(main)


def test_one_ipv6_64_holds_a_bounded_share_of_a_key() -> None:
    store = RecordStore()
    key = b"k" * 20
    honest = [(f"2001:db8:{n}::1", bytes([n]) * 32) for n in range(1, 4)]
    for ip, node_id in honest:
        store.add(key, node_id, ip, 4000, 1800, now=0.0)
    # One host owns 2001:db8:ffff::/64 and announces from 200 of its addresses, later and with
    # a day-long TTL.
    for n in range(200):
        store.add(key, os.urandom(32), f"2001:db8:ffff::{n + 1:x}", 4000, MAX_TTL, now=1.0 + n)
    live = store.get(key, 10.0, 1000)
    assert sum(r.ip.startswith("2001:db8:ffff:") for r in live) == store.per_prefix
    assert {r.node_id for r in live[:3]} == {node_id for _, node_id in honest}
    assert all(r.expires - r.announced <= DEFAULT_MAX_TTL for r in live)


def test_one_ipv6_64_shares_one_rate_limit_and_the_tables_stay_bounded() -> None:
    limits = RequestLimits(
        per_ip=Rate(0.0, 5), per_prefix=Rate(0.0, 20), total=Rate(0.0, 10**6), table_size=256
    )
    limiter = RequestLimiter(limits, now=0.0)
    admitted = sum(limiter.admit(f"2001:db8:1:2::{n:x}", 0.0) for n in range(1, 1001))
    assert admitted == 20  # 1,000 addresses of one /64: the /64's burst, not 1,000 x 5
    assert limiter.admit("2001:db8:1:3::1", 0.0)  # the next /64 is another subscriber
    # A dual-stack socket's mapped address is the IPv4 host it maps.
    assert sum(limiter.admit("::ffff:198.51.100.7", 0.0) for _ in range(10)) == 5
    assert not limiter.admit("198.51.100.7", 0.0)
    # 100,000 sources: the tables hold at most ``table_size`` each.
    for n in range(100_000):
        limiter.admit(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 0.0)
    assert limiter.tracked() <= (256, 256)
