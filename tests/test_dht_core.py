"""Sans-I/O parts of the private DHT: provider records, write tokens, datagram validation."""

from __future__ import annotations

import asyncio
import contextlib
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node  # type: ignore[import-untyped]

from p2pfs.discovery.dht.crawl import ProviderCrawl
from p2pfs.discovery.dht.messages import (
    CLIENT_REQUEST,
    MAX_DATAGRAM,
    REQUEST,
    RESPONSE,
    Contact,
    DhtMessageError,
    ProviderInfo,
    ProvidersReply,
    Request,
    Response,
    add_provider_reply_untrusted,
    contacts_to_wire,
    contacts_untrusted,
    datagram_untrusted,
    dht_key,
    encode_request,
    encode_response,
    ping_reply_untrusted,
    providers_reply_untrusted,
)
from p2pfs.discovery.dht.protocol import DhtProtocol
from p2pfs.discovery.dht.records import RecordStore
from p2pfs.discovery.dht.tokens import WriteTokens

KEYS = [bytes([i]) * 20 for i in range(4)]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "::1"]

announce = st.tuples(
    st.sampled_from(KEYS),
    st.binary(min_size=32, max_size=32),
    st.sampled_from(IPS),
    st.integers(1, 12),
    st.floats(0.5, 50.0),
    st.floats(0.0, 10.0),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(announce, max_size=80), st.integers(1, 6), st.integers(1, 4), st.integers(1, 30))
def test_records_stay_bounded_and_never_return_expired(
    steps: list[tuple[bytes, bytes, str, int, float, float]], per_key: int, per_ip: int, total: int
) -> None:
    store = RecordStore(per_key=per_key, per_ip=per_ip, total=total, max_ttl=20.0)
    now = 0.0
    for key, node_id, ip, port, ttl, advance in steps:
        now += advance
        store.add(key, node_id, ip, port, ttl, now)
        # The newest announce is always there (bounds evict others first) until it expires.
        assert any(r.node_id == node_id for r in store.get(key, now, 1000))
        assert len(store) <= total
        for each in KEYS:
            live = store.get(each, now, 1000)
            assert len(live) <= per_key
            assert all(r.expires > now for r in live)
            assert all(sum(1 for r in live if r.ip == ip) <= per_ip for ip in IPS)
            assert all(r.expires <= now + 20.0 for r in live)
    later = now + 21.0
    store.expire(later)
    assert len(store) == 0
    assert all(store.get(key, later, 10) == [] for key in KEYS)


def test_records_refresh_in_place_and_evict_oldest_when_full() -> None:
    store = RecordStore(per_key=64, total=3)
    store.add(KEYS[0], b"a" * 32, "10.0.0.1", 1, 10, now=0)
    store.add(KEYS[0], b"a" * 32, "10.0.0.1", 1, 10, now=5)
    assert len(store) == 1
    assert store.get(KEYS[0], 14, 5)[0].expires == 15
    store.add(KEYS[1], b"b" * 32, "10.0.0.1", 1, 10, now=6)
    store.add(KEYS[2], b"c" * 32, "10.0.0.1", 1, 10, now=6)
    store.add(KEYS[0], b"a" * 32, "10.0.0.1", 1, 10, now=7)  # refreshed: now the newest
    store.add(KEYS[3], b"d" * 32, "10.0.0.1", 1, 10, now=8)
    assert sorted(store.keys()) == sorted([KEYS[0], KEYS[2], KEYS[3]])


def test_one_address_cannot_fill_a_key() -> None:
    store = RecordStore(per_key=64, per_ip=8)
    for port in range(1, 100):
        store.add(KEYS[0], bytes([port]) * 32, "10.0.0.9", port, 1000, now=port)
    store.add(KEYS[0], b"h" * 32, "10.0.0.1", 1, 100, now=200)
    live = store.get(KEYS[0], 200, 100)
    assert len(live) == 9
    assert {r.port for r in live if r.ip == "10.0.0.9"} == set(range(92, 100))


addresses = st.tuples(st.sampled_from(IPS), st.integers(1, 65535))


@settings(max_examples=200, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=5),
    addresses,
    addresses,
    st.integers(0, 10**9),
)
def test_tokens_bind_address_and_live_one_to_two_rotations(
    first: bytes, secrets: list[bytes], me: tuple[str, int], other: tuple[str, int], t0: int
) -> None:
    tokens = WriteTokens(secret=first, now=t0, rotation=300)
    token = tokens.issue(*me)
    assert tokens.verify(token, *me)
    if other != me:
        assert not tokens.verify(token, *other)
    assert not tokens.verify(token[:-1] + bytes([token[-1] ^ 1]), *me)
    assert not tokens.needs_rotation(t0 + 299)
    assert tokens.needs_rotation(t0 + 300)
    tokens.rotate(secrets[0], t0 + 300)
    assert tokens.verify(token, *me)  # the previous secret is still accepted
    for n, secret in enumerate(secrets[1:], start=2):
        tokens.rotate(secret, t0 + 300 * n)
    if len(secrets) >= 2 and first not in secrets:
        assert not tokens.verify(token, *me)


def test_tokens_reject_bad_secrets() -> None:
    with pytest.raises(ValueError):
        WriteTokens(secret=b"short", now=0)


def test_dht_key_is_derived_not_truncated() -> None:
    key = bytes(range(32))
    assert len(dht_key(key)) == 20
    assert dht_key(key) != key[:20]
    assert dht_key(key) == dht_key(bytes(range(32)))


def test_round_trips() -> None:
    msg_id = b"m" * 20
    request = datagram_untrusted(encode_request(msg_id, "find_node", [b"a" * 20, b"b" * 20]))
    assert request == Request(msg_id, "find_node", (b"a" * 20, b"b" * 20))
    reply = ProvidersReply(
        b"t" * 16,
        (Contact(b"c" * 20, "127.0.0.1", 9),),
        (ProviderInfo(b"n" * 32, "::1", 7, 30),),
    )
    response = datagram_untrusted(encode_response(msg_id, reply.to_wire()))
    assert isinstance(response, Response)
    assert providers_reply_untrusted(response.payload) == reply
    assert ping_reply_untrusted(b"i" * 20) == b"i" * 20
    assert add_provider_reply_untrusted(True) is True


PARSERS = [
    ping_reply_untrusted,
    contacts_untrusted,
    providers_reply_untrusted,
    add_provider_reply_untrusted,
]

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=70),
    lambda children: (
        st.lists(children, max_size=40)
        | st.dictionaries(st.text(max_size=10), children, max_size=10)
    ),
    max_leaves=60,
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([0, 1, 2]), st.binary(min_size=20, max_size=20), msgpack_values)
def test_junk_payloads_raise_one_error_type(kind: int, msg_id: bytes, value: object) -> None:
    data = bytes([kind]) + msg_id + msgpack.packb(value, use_bin_type=True)
    try:
        message = datagram_untrusted(data)
    except DhtMessageError:
        return
    if isinstance(message, Response):
        for parse in PARSERS:
            with contextlib.suppress(DhtMessageError):
                parse(message.payload)
    # And as a request, with a real method name in front of junk arguments:
    for method in ("ping", "find_node", "get_providers", "add_provider"):
        with pytest.raises(DhtMessageError):
            datagram_untrusted(b"\x00" + msg_id + msgpack.packb([method, [value] * 7]))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=MAX_DATAGRAM + 10))
def test_random_bytes_raise_one_error_type(data: bytes) -> None:
    with contextlib.suppress(DhtMessageError):
        datagram_untrusted(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" + b"m" * 20 + b"\xdd\xff\xff\xff\xff",  # array of 2**32 elements, no body
        b"\x00" + b"m" * 20 + b"\xc6\xff\xff\xff\xff",  # bin of 4 GiB
        b"\x00" + b"m" * 20 + b"\x91" * 3000,  # deep nesting
        b"\x01" + b"m" * 20 + b"\xc7\x01\x05x",  # an ext type
        b"\x00" * (MAX_DATAGRAM + 1),
        b"\x00" + b"m" * 20 + msgpack.packb(["ping", [b"a" * 20]]) + b"trailing",
    ],
)
def test_hostile_datagrams(data: bytes) -> None:
    with pytest.raises(DhtMessageError):
        datagram_untrusted(data)


# --- the server's replies are the pinned encoders' output ------------------------------------


def served_protocol(contacts: int) -> DhtProtocol:
    rng = random.Random(14)
    me = Node(bytes(20), "192.0.2.1", 7000)
    protocol = DhtProtocol(
        me,
        ksize=8,
        rpc_timeout=1.0,
        records=RecordStore(),
        clock=lambda: 100.0,
        random_bytes=rng.randbytes,
    )
    for i in range(contacts):
        protocol.router.add_contact(Node(rng.randbytes(20), f"198.51.100.{i + 1}", 7000 + i))
    return protocol


@pytest.mark.parametrize("budget", [None, 3 * 81])
def test_served_get_providers_is_the_encoder_output_and_parses(budget: int | None) -> None:
    """What the server sends is ``ProvidersReply.to_wire`` (pinned by the golden vectors in
    protocol/vectors/discovery.json), read back whole by the parser a requester uses."""
    protocol = served_protocol(contacts=12)
    key = bytes([5]) * 20
    for i in range(6):
        protocol.records.add(key, bytes([i]) * 32, f"203.0.113.{i + 1}", 7337, 600, 100.0)
    sender = ("192.0.2.99", 4000)
    reply = protocol.rpc_get_providers(sender, bytes([9]) * 20, key, budget=budget)
    parsed = providers_reply_untrusted(reply)
    assert parsed.to_wire() == reply
    assert parsed.token == protocol.tokens.issue(*sender)
    assert all(p.ttl == 600 for p in parsed.providers)
    if budget is None:
        assert not parsed.truncated
        assert len(parsed.providers) == 6 and len(parsed.nodes) == 8
    else:
        assert parsed.truncated
        assert len(encode_response(bytes(20), reply)) <= budget
        assert parsed.providers  # the answer goes first


def test_served_find_node_is_the_encoder_output_and_parses() -> None:
    protocol = served_protocol(contacts=12)
    target = bytes([7]) * 20
    reply = protocol.rpc_find_node(("192.0.2.99", 4000), bytes([9]) * 20, target)
    contacts = contacts_untrusted(reply)
    assert contacts_to_wire(contacts) == reply
    distances = [int.from_bytes(c.id, "big") ^ int.from_bytes(target, "big") for c in contacts]
    assert len(contacts) == 8 and distances == sorted(distances)  # k nearest, nearest first


class _Sent:
    """A transport that keeps what the protocol sends."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, object]] = []

    def sendto(self, data: bytes, address: object) -> None:
        self.datagrams.append((data, address))


@pytest.mark.parametrize("from_client", [False, True])
def test_a_client_is_answered_but_joins_no_routing_table(from_client: bool) -> None:
    """A node behind a NAT asks as a client: it gets its answer, and the answerer does not
    add it as a contact (so no lookup ever hands its address to others to contact)."""
    protocol = served_protocol(contacts=3)
    sent = _Sent()
    protocol.transport = sent
    asker = bytes([0xAB]) * 20
    request = encode_request(
        bytes([1]) * 20, "find_node", [asker, bytes(20)], from_client=from_client
    )
    assert request[0] == (CLIENT_REQUEST if from_client else REQUEST)
    protocol.datagram_received(request, ("203.0.113.9", 7337))
    assert len(sent.datagrams) == 1 and sent.datagrams[0][0][0] == RESPONSE
    known = {bytes(node.id) for bucket in protocol.router.buckets for node in bucket.get_nodes()}
    assert (asker in known) is not from_client


def test_a_lookup_is_not_ended_by_records_that_name_the_asker() -> None:
    """A crawl against a scripted protocol: the nearest node holds only the asker's own
    record (it stored our announce, never the other provider's); the next holds the other
    provider's. The lookup must go on past the first and find the other; on the code before
    it ended there with nothing but itself (which the daemon then left out)."""
    asker, other = b"\x01" * 32, b"\x02" * 32
    target = Node(b"\x00" * 20)
    near = Node(b"\x00" * 19 + b"\x01", "198.51.100.1", 7337)
    far = Node(b"\x00" * 19 + b"\x07", "198.51.100.2", 7337)
    mine = ProviderInfo(asker, "203.0.113.1", 7337, 600)
    theirs = ProviderInfo(other, "203.0.113.2", 7337, 600)
    replies = {
        near.id: ProvidersReply(b"t", (Contact(far.id, far.ip, far.port),), (mine,)),
        far.id: ProvidersReply(b"t", (), (mine, theirs)),
    }

    class Scripted:
        async def call_get_providers(self, node: Node, key: bytes) -> tuple[bool, object]:
            # The near node answers at once, the far one a moment later: the crawl must
            # not have stopped in between.
            await asyncio.sleep(0.0 if node.id == near.id else 0.01)
            return True, replies[node.id]

    async def crawl(exclude: bytes | None) -> ProviderCrawl:
        found = ProviderCrawl(
            Scripted(),  # type: ignore[arg-type]
            target,
            [near],
            ksize=4,
            alpha=1,
            stop_on_found=True,
            asker=exclude,
        )
        await found.find()
        return found

    with_asker = asyncio.run(crawl(asker))
    assert [p.node_id for p in with_asker.providers.values()] == [other]
    assert with_asker.queried == 2 and with_asker.rounds == 2
    without = asyncio.run(crawl(None))  # what a crawl that counts our own record does
    assert [p.node_id for p in without.providers.values()] == [asker]
