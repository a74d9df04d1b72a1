"""PiecePicker: the rules of issue 5 as properties, a state machine against a model, scale."""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from p2pfs.errors import LocalProtocolError
from p2pfs.swarm import PickPolicy, PiecePicker

PEERS = [f"p{i}" for i in range(5)]


class PickerMachine(RuleBasedStateMachine):
    """Drives a PiecePicker with random operations and checks every answer against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.picker: PiecePicker
        self.held: set[int] = set()
        self.peers: dict[str, set[int] | None] = {}
        self.out: dict[str, set[int]] = {}
        self.fresh_picks = 0
        self.random_first = 0
        self.endgame_pieces: int | None = None
        self.groups: list[int] | None = None
        self.started: set[int] = set()

    @initialize(
        n=st.integers(1, 24),
        data=st.data(),
        random_first=st.integers(0, 3),
        endgame_pieces=st.none() | st.integers(0, 4),
        use_groups=st.booleans(),
        seed=st.integers(0, 2**32),
    )
    def setup(
        self,
        n: int,
        data: st.DataObject,
        random_first: int,
        endgame_pieces: int | None,
        use_groups: bool,
        seed: int,
    ) -> None:
        self.n = n
        self.held = data.draw(st.sets(st.integers(0, n - 1), max_size=n // 2))
        self.random_first = random_first
        self.endgame_pieces = endgame_pieces
        if use_groups:
            # Files of 1-4 consecutive pieces, in tree order.
            sizes = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
            self.groups = [g for g, size in enumerate(sizes) for _ in range(size)][:n]
            self.started = {self.groups[p] for p in self.held}
        self.picker = PiecePicker(
            n,
            sorted(self.held),
            random.Random(seed),
            random_first=random_first,
            endgame_pieces=endgame_pieces,
            groups=self.groups,
        )

    # -- model helpers -----------------------------------------------------------------------

    def has(self, peer: str, piece: int) -> bool:
        pieces = self.peers[peer]
        return pieces is None or piece in pieces

    def avail(self, piece: int) -> int:
        return sum(1 for peer in self.peers if self.has(peer, piece))

    def outstanding_anywhere(self, piece: int) -> bool:
        return any(piece in pieces for pieces in self.out.values())

    def fresh(self, peer: str) -> set[int]:
        return {
            p
            for p in range(self.n)
            if p not in self.held and not self.outstanding_anywhere(p) and self.has(peer, p)
        }

    def endgame(self) -> bool:
        missing = self.n - len(self.held)
        if missing == 0 or not any(self.out.values()):
            return False
        if self.endgame_pieces is not None and missing <= self.endgame_pieces:
            return True
        return all(p in self.held or self.outstanding_anywhere(p) for p in range(self.n))

    def random_phase(self) -> bool:
        return self.fresh_picks < self.random_first and len(self.held) < self.random_first

    # -- rules -------------------------------------------------------------------------------

    @rule(i=st.integers(0, len(PEERS) - 1), data=st.data())
    def add_peer(self, i: int, data: st.DataObject) -> None:
        peer = PEERS[i]
        if peer in self.peers:
            with pytest.raises(LocalProtocolError):
                self.picker.add_peer(peer, [])
            return
        has = data.draw(st.none() | st.sets(st.integers(0, self.n - 1)))
        self.picker.add_peer(peer, None if has is None else sorted(has))
        self.peers[peer] = has
        self.out[peer] = set()

    @rule(i=st.integers(0, len(PEERS) - 1), data=st.data())
    def peer_has(self, i: int, data: st.DataObject) -> None:
        peer = PEERS[i]
        piece = data.draw(st.integers(0, self.n - 1))
        if peer not in self.peers:
            with pytest.raises(LocalProtocolError):
                self.picker.peer_has(peer, piece)
            return
        self.picker.peer_has(peer, piece)
        pieces = self.peers[peer]
        if pieces is not None:
            pieces.add(piece)

    @precondition(lambda self: bool(self.peers))
    @rule(data=st.data())
    def remove_peer(self, data: st.DataObject) -> None:
        peer = data.draw(st.sampled_from(sorted(self.peers)))
        assert self.picker.remove_peer(peer) == sorted(self.out[peer])
        del self.peers[peer]
        del self.out[peer]

    @precondition(lambda self: bool(self.peers))
    @rule(data=st.data(), count=st.integers(0, 6))
    def pick(self, data: st.DataObject, count: int) -> None:
        peer = data.draw(st.sampled_from(sorted(self.peers)))
        got = self.picker.pick(peer, count)
        assert len(got) <= count
        assert len(set(got)) == len(got)
        for piece in got:
            assert piece not in self.held, "picked a piece we hold"
            assert self.has(peer, piece), "picked a piece the peer does not have"
            assert piece not in self.out[peer]
            if self.outstanding_anywhere(piece):
                assert self.endgame(), "duplicate request outside endgame"
                assert not self.fresh(peer), "duplicate while a fresh piece was pickable"
            else:
                candidates = self.fresh(peer)
                assert piece in candidates
                if not self.random_phase():
                    rarest = min(self.avail(p) for p in candidates)
                    assert self.avail(piece) == rarest, "not rarest first"
                    if self.groups is not None:
                        tied = [p for p in candidates if self.avail(p) == rarest]
                        if any(self.groups[p] in self.started for p in tied):
                            assert self.groups[piece] in self.started, "in-order tie-break"
                self.fresh_picks += 1
                if self.groups is not None:
                    self.started.add(self.groups[piece])
            self.out[peer].add(piece)
        if len(got) < count:
            assert not self.fresh(peer), "stopped short with fresh pieces left"
            if self.endgame():
                dupes = [
                    p
                    for pieces in self.out.values()
                    for p in pieces
                    if p not in self.out[peer] and self.has(peer, p)
                ]
                assert not dupes, "stopped short with endgame duplicates left"

    @rule(data=st.data())
    def received(self, data: st.DataObject) -> None:
        requested: list[tuple[int, str]] = sorted(
            {(p, q) for q, pieces in self.out.items() for p in pieces}
        )
        solicited = data.draw(st.booleans())
        if requested and solicited:
            piece, peer = data.draw(st.sampled_from(requested))
        else:  # unsolicited, duplicate or from a peer already gone
            piece = data.draw(st.integers(0, self.n - 1))
            peer = data.draw(st.sampled_from(PEERS))
        requesters = {q for q, pieces in self.out.items() if piece in pieces}
        cancels = self.picker.received(piece, peer)
        assert len(cancels) == len(set(cancels))
        assert set(cancels) == requesters - {peer}
        for pieces in self.out.values():
            pieces.discard(piece)
        self.held.add(piece)
        if self.groups is not None:
            self.started.add(self.groups[piece])

    @rule(i=st.integers(0, len(PEERS) - 1), data=st.data())
    def failed(self, i: int, data: st.DataObject) -> None:
        peer = PEERS[i]
        pieces = data.draw(st.sets(st.integers(0, self.n - 1), max_size=4))
        self.picker.failed(peer, pieces)
        if peer in self.out:
            self.out[peer] -= pieces

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self) -> None:
        if not self.n:
            return
        assert self.picker.missing == self.n - len(self.held)
        assert self.picker.complete == (len(self.held) == self.n)
        assert self.picker.in_endgame == self.endgame()
        for peer, pieces in self.out.items():
            assert self.picker.outstanding(peer) == pieces
        for piece in range(self.n):
            assert self.picker.availability(piece) == self.avail(piece)
            assert self.picker.holds(piece) == (piece in self.held)


TestPickerMachine = PickerMachine.TestCase
TestPickerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 120),
    peer_count=st.integers(1, 6),
    seed=st.integers(0, 2**32),
    policy=st.sampled_from(list(PickPolicy)),
    endgame_pieces=st.none() | st.integers(0, 8),
)
def test_completes_under_random_operations(
    n: int, peer_count: int, seed: int, policy: PickPolicy, endgame_pieces: int | None
) -> None:
    rng = random.Random(seed)
    have = [p for p in range(n) if rng.random() < 0.2]
    picker = PiecePicker(
        n, have, random.Random(seed + 1), policy=policy, endgame_pieces=endgame_pieces
    )
    holdings: dict[Hashable, set[int] | None] = {}
    for i in range(peer_count):
        holdings[i] = None if i == 0 else {p for p in range(n) if rng.random() < 0.5}
    for peer, has in holdings.items():
        picker.add_peer(peer, None if has is None else sorted(has))
    duplicates = 0
    for _ in range(20 * n + 100):
        if picker.complete:
            break
        peer = rng.choice(list(holdings))
        choice = rng.random()
        if choice < 0.5:
            picker.pick(peer, rng.randint(1, 4))
        elif choice < 0.8:
            pending = sorted(picker.outstanding(peer))
            if pending:
                duplicates += len(picker.received(rng.choice(pending), peer))
        elif choice < 0.9:
            picker.failed(peer, [p for p in picker.outstanding(peer) if rng.random() < 0.5])
        elif choice < 0.95:
            returned = picker.remove_peer(peer)
            assert all(not picker.holds(p) for p in returned)
            has = holdings[peer]
            picker.add_peer(peer, None if has is None else sorted(has))
        else:
            piece = rng.randrange(n)
            for other, has in holdings.items():
                if has is not None and rng.random() < 0.3:
                    has.add(piece)
                    picker.peer_has(other, piece)
    assert picker.complete, f"{picker.missing} pieces missing"
    assert picker.missing == 0
    assert not picker.in_endgame
    assert all(not picker.outstanding(peer) for peer in holdings)


def test_random_first_then_rarest() -> None:
    # Piece 7 has one holder, every other piece two: rarest first picks 7 at once.
    firsts = set()
    for seed in range(30):
        picker = PiecePicker(50, [], random.Random(seed), random_first=4)
        picker.add_peer("seed", None)
        picker.add_peer("partial", [p for p in range(50) if p != 7])
        firsts.add(picker.pick("seed", 1)[0])
        strict = PiecePicker(50, [], random.Random(seed), random_first=0)
        strict.add_peer("seed", None)
        strict.add_peer("partial", [p for p in range(50) if p != 7])
        assert strict.pick("seed", 1) == [7]
    assert len(firsts) > 5, "random_first picks should be spread out"


def test_random_first_skipped_when_we_already_hold_enough() -> None:
    picker = PiecePicker(50, range(40, 44), random.Random(3), random_first=4)
    picker.add_peer("seed", None)
    picker.add_peer("partial", [p for p in range(50) if p != 7])
    assert picker.pick("seed", 1) == [7]


def test_in_order_preference_completes_started_files_first() -> None:
    groups = [p // 10 for p in range(100)]  # ten files of ten pieces
    picker = PiecePicker(100, [], random.Random(5), random_first=0, groups=groups)
    picker.add_peer("seed", None)
    first = picker.pick("seed", 1)[0]
    file = first // 10
    rest = picker.pick("seed", 9)
    assert sorted([first, *rest]) == list(range(file * 10, file * 10 + 10))


def test_rarity_beats_in_order_preference() -> None:
    groups = [p // 10 for p in range(30)]
    picker = PiecePicker(30, [0], random.Random(5), random_first=0, groups=groups)
    picker.add_peer("seed", None)
    picker.add_peer("partial", [p for p in range(30) if p != 25])
    assert picker.pick("seed", 1) == [25]  # rarer, although file 0 is started
    assert picker.pick("seed", 1)[0] in range(1, 10)  # then the started file


def test_endgame_duplicates_and_cancels() -> None:
    picker = PiecePicker(3, [], random.Random(1), random_first=0)
    for peer in "abc":
        picker.add_peer(peer, None)
    assert not picker.in_endgame
    assert sorted(picker.pick("a", 2) + picker.pick("b", 1)) == [0, 1, 2]
    assert picker.in_endgame
    dupes = picker.pick("c", 5)
    assert sorted(dupes) == [0, 1, 2]
    piece = picker.pick("a", 1)[0]  # a duplicate of b's piece
    assert piece in picker.outstanding("b")
    assert sorted(map(str, picker.received(piece, "b"))) == ["a", "c"]
    assert piece not in picker.outstanding("a") | picker.outstanding("c")
    assert picker.received(piece, "a") == []  # the duplicate that beat its cancel


def test_endgame_pieces_threshold_allows_duplicates_early() -> None:
    picker = PiecePicker(4, [], random.Random(1), random_first=0, endgame_pieces=4)
    picker.add_peer("a", None)
    picker.add_peer("b", [0])
    assert not picker.in_endgame  # nothing outstanding yet
    first = picker.pick("a", 1)
    assert first[0] in (1, 2, 3)  # rarer than piece 0
    assert picker.in_endgame  # 4 missing <= 4, although 3 are still unrequested
    assert picker.pick("b", 2) == [0]
    rest = picker.pick("a", 5)
    assert sorted(rest) == sorted({0, 1, 2, 3} - set(first))  # 2 fresh, then 0 duplicated
    assert rest[-1] == 0


def test_no_endgame_while_fresh_pieces_remain() -> None:
    picker = PiecePicker(10, [], random.Random(1), random_first=0)
    picker.add_peer("a", None)
    picker.add_peer("b", [0, 1])
    got = picker.pick("a", 8)
    assert sorted(got) == list(range(2, 10))  # the rarer ones first
    assert not picker.in_endgame  # pieces 0 and 1 still unrequested
    assert sorted(picker.pick("a", 5)) == [0, 1]  # no duplicates of its own requests
    assert picker.in_endgame
    assert picker.pick("b", 5) in ([0, 1], [1, 0])


def test_unavailable_pieces_keep_us_out_of_endgame() -> None:
    picker = PiecePicker(4, [], random.Random(1), random_first=0)
    picker.add_peer("a", [0, 1])
    picker.add_peer("b", [0, 1])
    assert sorted(picker.pick("a", 4)) == [0, 1]
    assert not picker.in_endgame  # pieces 2 and 3: nobody has them yet
    assert picker.pick("b", 4) == []
    picker.add_peer("c", [2, 3])
    assert sorted(picker.pick("c", 4)) == [2, 3]
    assert picker.in_endgame
    assert sorted(picker.pick("b", 4)) == [0, 1]


def test_remove_peer_and_failed_return_pieces_to_the_pool() -> None:
    picker = PiecePicker(6, [], random.Random(2), random_first=0)
    picker.add_peer("a", None)
    picker.add_peer("b", None)
    got = picker.pick("a", 4)
    assert picker.remove_peer("a") == sorted(got)
    again = picker.pick("b", 6)
    assert set(got) <= set(again)
    picker.failed("b", again[:3])
    assert picker.outstanding("b") == set(again[3:])
    assert sorted(picker.pick("b", 6)) == sorted(again[:3])
    picker.failed("gone", [0])  # a late failure after remove_peer is harmless


def test_sequential_and_random_policies() -> None:
    seq = PiecePicker(20, [0, 3], random.Random(1), policy=PickPolicy.SEQUENTIAL)
    seq.add_peer("a", [2, 4, 5, 6, 9])
    assert seq.pick("a", 3) == [2, 4, 5]
    seq.add_peer("s", None)
    assert seq.pick("s", 3) == [1, 6, 7]
    rnd = PiecePicker(20, [], random.Random(1), policy=PickPolicy.RANDOM)
    rnd.add_peer("a", [2, 4, 5, 6, 9])
    assert sorted(rnd.pick("a", 10)) == [2, 4, 5, 6, 9]


def test_misuse_is_a_local_error() -> None:
    picker = PiecePicker(4, [], random.Random(1))
    with pytest.raises(LocalProtocolError):
        picker.pick("nobody", 1)
    with pytest.raises(LocalProtocolError):
        picker.add_peer("a", [4])
    picker.add_peer("b", None)
    with pytest.raises(LocalProtocolError):
        picker.add_peer("b", None)
    with pytest.raises(LocalProtocolError):
        picker.received(-1, "b")
    with pytest.raises(LocalProtocolError):
        picker.remove_peer("nobody")
    with pytest.raises(LocalProtocolError):
        PiecePicker(3, [], random.Random(1), groups=[0, 1])


def test_scale_100k_pieces_50_peers() -> None:
    """A whole download of 100,000 pieces from 50 peers, picks of 16: every pick names a
    piece its peer holds, and the download completes without stalling. Five peers hold
    everything, so while pieces are missing a pick has at least a 1 in 10 chance to get some:
    200 empty picks in a row (probability < 1e-9) means the picker stopped handing them out.
    Speed is not asserted here (a wall-clock bound measures the machine, not the picker)."""
    n = 100_000
    rng = random.Random(7)
    picker = PiecePicker(n, [], random.Random(8))
    holdings: dict[Hashable, range | set[int]] = {}
    for i in range(50):
        if i < 5:
            holdings[i] = range(n)
            picker.add_peer(i, None)
        elif i < 30:  # random halves
            bits = rng.randbytes(n)
            holdings[i] = {p for p in range(n) if bits[p] < 128}
            picker.add_peer(i, sorted(holdings[i]))
        else:  # whole files: contiguous slices
            start = rng.randrange(n)
            holdings[i] = range(start, min(n, start + 20_000))
            picker.add_peer(i, holdings[i])
    peers = list(holdings)
    received = 0
    empty_run = 0
    while not picker.complete:
        peer = rng.choice(peers)
        picked = picker.pick(peer, 16)
        empty_run = 0 if picked else empty_run + 1
        assert empty_run < 200, "the picker stopped handing out pieces"
        for piece in picked:
            assert piece in holdings[peer]
            picker.received(piece, peer)
            received += 1
    assert received == n  # each piece once: nothing is outstanding when the endgame starts


def test_endgame_opt_out_and_requester_cap() -> None:
    picker = PiecePicker(2, [], random.Random(1), random_first=0, max_requesters=2)
    for peer in "abcd":
        picker.add_peer(peer, None)
    assert sorted(picker.pick("a", 2)) == [0, 1]
    assert picker.in_endgame
    assert picker.pick("b", 2, endgame=False) == []  # fresh pieces only
    assert sorted(picker.pick("b", 2)) == [0, 1]
    assert picker.pick("c", 2) == []  # each piece already has 2 requesters
    picker.failed("b", [1])
    assert picker.pick("d", 2) == [1]
    with pytest.raises(LocalProtocolError):
        PiecePicker(2, [], random.Random(1), max_requesters=0)


def test_duplicates_newest_request_first() -> None:
    """A peer answers in order: its newest requests come last, so those are duplicated
    first; a piece with fewer requesters still comes before one with more."""
    picker = PiecePicker(4, [], random.Random(1), random_first=0)
    for peer in "abc":
        picker.add_peer(peer, None)
    order = picker.pick("a", 4)
    assert picker.pick("b", 1) == [order[-1]]
    assert picker.pick("c", 4) == [order[2], order[1], order[0], order[3]]


def test_idle_is_nothing_outstanding() -> None:
    picker = PiecePicker(2, [], random.Random(1), random_first=0)
    picker.add_peer("a", None)
    assert picker.idle("a")
    (piece,) = picker.pick("a", 1)
    assert not picker.idle("a")
    picker.received(piece, "a")
    assert picker.idle("a")
