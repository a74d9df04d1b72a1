"""Which chunk to request from which peer: rarest first, random start, in-order ties, endgame.

A *piece* is an integer ``0..piece_count-1``: a position in a share's list of unique chunks in
tree order. A *peer* is any hashable key. The picker is sans-I/O: the caller tells it what
peers hold (``add_peer``, ``peer_has``), what arrived (``received``) and what went wrong
(``failed``, ``remove_peer``); it answers ``pick(peer, count)`` with the pieces to request
from that peer now, and on ``received`` with the other peers whose duplicate requests
should be cancelled. Randomness comes in as a ``random.Random``.

Rules:

- Never picks a piece we hold, nor one that the peer asked does not have.
- Outside endgame a piece is outstanding with at most one peer.
- **Rarest first**: the picked piece has the fewest connected holders among the pieces this
  peer could serve; ties are broken at random, except that pieces of a *started* group
  (a file of which we hold or requested at least one piece, when ``groups`` is given) come
  before pieces of untouched groups, so partly fetched files complete first.
- **Random first**: while both the number of pieces picked so far and the number held are
  below ``random_first``, picks are uniform among what the peer can serve, so a newcomer soon
  holds something that others want (the rarest pieces are by definition the slowest to get).
- **Endgame**: once every missing piece is outstanding (or
  at most ``endgame_pieces`` pieces are missing), a peer with spare capacity gets duplicate
  requests for outstanding pieces it has (fewest requesters, then the newest request
  first: a peer answers its requests in order, so the newest are the ones it will deliver
  last, and a duplicate of its oldest would race a piece already on its way);
  ``received`` then names the other requesters to cancel.

Structure (BitTorrent's rarity buckets): the *pool* (missing pieces not outstanding) is
split into buckets by availability, each an indexable set (O(1) add, remove, uniform
choice), each in two tiers (started group first). Seeders (``has=None``) are counted once,
not per piece: they add the same amount to every piece, which leaves the order unchanged,
so adding or removing a seeder is O(1). A partial peer's holdings are a bytearray bitmap.

Costs: ``add_peer``/``remove_peer`` O(pieces the peer has); ``peer_has``, ``received``,
``failed`` O(1) per piece (amortised: a group is promoted to the started tier once);
``pick`` from a seeder O(count + buckets); from a partial peer O(count) expected by
rejection sampling inside the rarest bucket, falling back, when the peer holds few of that
bucket's pieces, to one exact scan: a C-speed AND of two bitmaps plus a Python pass over the
pieces both hold (so at most O(piece_count) in C and O(pool ∩ peer) in Python). Endgame picks
scan the outstanding pieces (few by then).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from p2pfs.errors import LocalProtocolError

__all__ = ["PickPolicy", "PiecePicker"]


class PickPolicy(enum.Enum):
    """The order in which pool pieces are picked (endgame applies to all three)."""

    RAREST = "rarest"
    """Rarest first with a random start and in-order tie-breaking: the default, use this."""
    RANDOM = "random"
    """Uniform among what the peer can serve: a baseline for simulations."""
    SEQUENTIAL = "sequential"
    """Lowest index the peer can serve: a baseline (what a naive streamer does)."""


class _IndexedSet:
    """A set of ints with O(1) add, discard, membership and uniform random choice."""

    __slots__ = ("index", "items")

    def __init__(self) -> None:
        self.items: list[int] = []
        self.index: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, x: int) -> bool:
        return x in self.index

    def add(self, x: int) -> None:
        if x not in self.index:
            self.index[x] = len(self.items)
            self.items.append(x)

    def discard(self, x: int) -> None:
        i = self.index.pop(x, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.index[last] = i


@dataclass(slots=True)
class _Peer:
    has: bytearray | None
    """One byte per piece (1 = holds it); None for a seeder (holds everything)."""
    count: int
    outstanding: set[int] = field(default_factory=set)


def _positions(bitmap: bytes | bytearray, start: int = 0) -> Iterator[int]:
    i = bitmap.find(1, start)
    while i != -1:
        yield i
        i = bitmap.find(1, i + 1)


_PREFERRED = 0
_REST = 1


class PiecePicker:
    """Decides what to request from each peer; see the module docstring for the rules.

    ``groups`` (optional) maps each piece to its file index; equally rare pieces of files
    already started are then picked first. ``policy`` selects a baseline order for
    simulations; daemons keep the default. ``max_requesters`` caps how many peers one
    piece may be requested from at once in endgame (None: no cap).
    """

    def __init__(
        self,
        piece_count: int,
        have: Iterable[int],
        rng: random.Random,
        *,
        random_first: int = 4,
        endgame_pieces: int | None = None,
        groups: Sequence[int] | None = None,
        policy: PickPolicy = PickPolicy.RAREST,
        max_requesters: int | None = None,
    ) -> None:
        if piece_count < 0:
            raise LocalProtocolError(f"piece_count must be >= 0, not {piece_count}")
        if random_first < 0:
            raise LocalProtocolError(f"random_first must be >= 0, not {random_first}")
        if endgame_pieces is not None and endgame_pieces < 0:
            raise LocalProtocolError(f"endgame_pieces must be >= 0, not {endgame_pieces}")
        self._n = piece_count
        self._rng = rng
        self._random_first = random_first
        self._endgame_pieces = endgame_pieces
        if max_requesters is not None and max_requesters < 1:
            raise LocalProtocolError(f"max_requesters must be >= 1, not {max_requesters}")
        self._max_requesters = max_requesters
        self._policy = policy
        self._have = bytearray(piece_count)
        for piece in have:
            self._check(piece)
            self._have[piece] = 1
        self._missing = piece_count - self._have.count(1)
        self._avail = [0] * piece_count
        """Connected partial peers holding each piece (seeders are counted in _seeders)."""
        self._seeders = 0
        self._peers: dict[Hashable, _Peer] = {}
        self._requests: dict[int, set[Hashable]] = {}
        """Outstanding pieces and the peers they are requested from."""
        self._fresh_picks = 0
        self._requested_at: dict[int, int] = {}
        """Outstanding piece -> value of _fresh_picks when it was requested (its age)."""
        self._seq_hint = 0
        self._groups: list[int] | None = None
        self._members: list[list[int]] = []
        self._started = bytearray()
        if groups is not None:
            if len(groups) != piece_count:
                raise LocalProtocolError(f"groups has {len(groups)} entries, not {piece_count}")
            self._groups = list(groups)
            if any(g < 0 for g in self._groups):
                raise LocalProtocolError("group indices must be >= 0")
            group_count = max(self._groups, default=-1) + 1
            self._members = [[] for _ in range(group_count)]
            for piece, g in enumerate(self._groups):
                self._members[g].append(piece)
            self._started = bytearray(group_count)
            for piece in _positions(self._have):
                self._started[self._groups[piece]] = 1
        self._in_pool = bytearray(1 - b for b in self._have)
        self._pool = _IndexedSet()
        self._buckets: list[tuple[_IndexedSet, _IndexedSet]] = [(_IndexedSet(), _IndexedSet())]
        for piece in _positions(self._in_pool):
            self._pool.add(piece)
            self._buckets[0][self._tier(piece)].add(piece)

    # -- what the caller tells us ------------------------------------------------------------

    def add_peer(self, peer: Hashable, has: Iterable[int] | None) -> None:
        """A peer connected; ``has`` is what it holds, or None for a seeder (everything)."""
        if peer in self._peers:
            raise LocalProtocolError(f"peer {peer!r} is already added")
        if has is None:
            self._peers[peer] = _Peer(None, self._n)
            self._seeders += 1
            return
        state = _Peer(bytearray(self._n), 0)
        self._peers[peer] = state
        for piece in has:
            self._add_piece(state, piece)

    def peer_has(self, peer: Hashable, piece: int) -> None:
        """``peer`` announced that it now holds ``piece`` (idempotent)."""
        self._add_piece(self._peer(peer), piece)

    def remove_peer(self, peer: Hashable) -> list[int]:
        """A peer is gone; returns the pieces that were outstanding with it, sorted.

        Those not also requested elsewhere (endgame duplicates) are back in the pool.
        """
        state = self._peer(peer)
        del self._peers[peer]
        pieces = sorted(state.outstanding)
        for piece in pieces:
            self._drop_request(piece, peer)
        if state.has is None:
            self._seeders -= 1
        else:
            for piece in _positions(state.has):
                self._change_avail(piece, -1)
        return pieces

    def received(self, piece: int, peer: Hashable) -> list[Hashable]:
        """``piece`` arrived from ``peer`` and verified: we hold it now.

        Returns the other peers it was still requested from (endgame duplicates): the caller
        cancels those requests. The piece is no longer outstanding with any peer. ``peer``
        may be one already removed (data that was in flight), or the piece one we already
        hold (a duplicate that beat its cancel): both are fine.
        """
        self._check(piece)
        requesters = self._requests.pop(piece, set())
        self._requested_at.pop(piece, None)
        for other in requesters:
            self._peers[other].outstanding.discard(piece)
        if not self._have[piece]:
            self._have[piece] = 1
            self._missing -= 1
            if self._in_pool[piece]:
                self._pool_remove(piece)
            self._start_group(piece)
        return [other for other in requesters if other != peer]

    def failed(self, peer: Hashable, pieces: Iterable[int]) -> None:
        """Requests to ``peer`` failed, stalled or were cancelled: back in the pool.

        Pieces not outstanding with ``peer``, and peers already removed, are ignored (a
        late failure after ``remove_peer`` or ``received`` is harmless).
        """
        state = self._peers.get(peer)
        if state is None:
            return
        for piece in pieces:
            if piece in state.outstanding:
                state.outstanding.discard(piece)
                self._drop_request(piece, peer)

    # -- what we answer ----------------------------------------------------------------------

    def pick(self, peer: Hashable, count: int, *, endgame: bool = True) -> list[int]:
        """Up to ``count`` pieces to request from ``peer`` now; they become outstanding.

        Fewer (possibly none) when the peer has nothing more that we may ask of it. In
        endgame, duplicates come after fresh pieces, the pieces with the fewest requesters
        and then the newest requests first; ``endgame=False`` asks for fresh pieces only (a
        caller that duplicates only to idle peers, which wastes far less, passes
        ``endgame=picker.idle(peer)``).
        """
        state = self._peer(peer)
        out: list[int] = []
        if count <= 0 or self._missing == 0:
            return out
        if self._policy is PickPolicy.RAREST:
            while len(out) < count and self._random_phase():
                got = self._pick_uniform(peer, state, 1, out)
                if not got:
                    break
            if len(out) < count:
                self._pick_rarest(peer, state, count - len(out), out)
        elif self._policy is PickPolicy.RANDOM:
            self._pick_uniform(peer, state, count, out)
        else:
            self._pick_sequential(peer, state, count, out)
        if endgame and len(out) < count and self.in_endgame:
            self._pick_duplicates(peer, state, count - len(out), out)
        return out

    def outstanding(self, peer: Hashable) -> set[int]:
        """The pieces requested from ``peer`` and not yet received, failed or cancelled."""
        return set(self._peer(peer).outstanding)

    def idle(self, peer: Hashable) -> bool:
        """Nothing is outstanding with ``peer``: what a caller that duplicates only to idle
        peers passes as ``pick(..., endgame=picker.idle(peer))``."""
        return not self._peer(peer).outstanding

    def holds(self, piece: int) -> bool:
        """We hold ``piece`` (it was in ``have`` or has been received)."""
        self._check(piece)
        return bool(self._have[piece])

    def pickable(self, piece: int) -> bool:
        """We lack ``piece`` and it is requested from nobody: a fresh pick could take it."""
        self._check(piece)
        return bool(self._in_pool[piece])

    def availability(self, piece: int) -> int:
        """How many connected peers (seeders included) hold ``piece``."""
        self._check(piece)
        return self._avail[piece] + self._seeders

    @property
    def complete(self) -> bool:
        return self._missing == 0

    @property
    def missing(self) -> int:
        """Pieces we do not hold yet (outstanding ones included)."""
        return self._missing

    @property
    def in_endgame(self) -> bool:
        """Duplicate requests are allowed: something is outstanding and either at most
        ``endgame_pieces`` pieces are missing or every missing piece is outstanding.

        A piece that no connected peer holds keeps us out of endgame: when only the
        neighbours' holdings run short mid-download, duplicates would waste their upload."""
        if self._missing == 0 or not self._requests:
            return False
        if self._endgame_pieces is not None and self._missing <= self._endgame_pieces:
            return True
        return not self._pool

    # -- internals ---------------------------------------------------------------------------

    def _check(self, piece: int) -> None:
        if not 0 <= piece < self._n:
            raise LocalProtocolError(f"piece {piece} is outside 0..{self._n - 1}")

    def _peer(self, peer: Hashable) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            raise LocalProtocolError(f"unknown peer {peer!r}")
        return state

    def _tier(self, piece: int) -> int:
        if self._groups is not None and self._started[self._groups[piece]]:
            return _PREFERRED
        return _REST

    def _add_piece(self, state: _Peer, piece: int) -> None:
        self._check(piece)
        if state.has is None or state.has[piece]:
            return
        state.has[piece] = 1
        state.count += 1
        self._change_avail(piece, +1)

    def _change_avail(self, piece: int, delta: int) -> None:
        old = self._avail[piece]
        new = old + delta
        self._avail[piece] = new
        if self._in_pool[piece]:
            while len(self._buckets) <= new:
                self._buckets.append((_IndexedSet(), _IndexedSet()))
            tier = self._tier(piece)
            self._buckets[old][tier].discard(piece)
            self._buckets[new][tier].add(piece)

    def _pool_add(self, piece: int) -> None:
        while len(self._buckets) <= self._avail[piece]:
            self._buckets.append((_IndexedSet(), _IndexedSet()))
        self._in_pool[piece] = 1
        self._pool.add(piece)
        self._buckets[self._avail[piece]][self._tier(piece)].add(piece)
        self._seq_hint = min(self._seq_hint, piece)

    def _pool_remove(self, piece: int) -> None:
        self._in_pool[piece] = 0
        self._pool.discard(piece)
        self._buckets[self._avail[piece]][self._tier(piece)].discard(piece)

    def _start_group(self, piece: int) -> None:
        if self._groups is None:
            return
        g = self._groups[piece]
        if self._started[g]:
            return
        for other in self._members[g]:
            if self._in_pool[other]:
                level = self._buckets[self._avail[other]]
                level[_REST].discard(other)
                level[_PREFERRED].add(other)
        self._started[g] = 1

    def _drop_request(self, piece: int, peer: Hashable) -> None:
        requesters = self._requests[piece]
        requesters.discard(peer)
        if not requesters:
            del self._requests[piece]
            del self._requested_at[piece]
            self._pool_add(piece)

    def _take(self, piece: int, peer: Hashable, state: _Peer, out: list[int]) -> None:
        self._pool_remove(piece)
        self._requests[piece] = {peer}
        self._requested_at[piece] = self._fresh_picks
        state.outstanding.add(piece)
        self._fresh_picks += 1
        self._start_group(piece)
        out.append(piece)

    def _random_phase(self) -> bool:
        held = self._n - self._missing
        return self._fresh_picks < self._random_first and held < self._random_first

    def _both(self, has: bytearray) -> bytes:
        """Bitmap of the pool pieces that a partial peer holds (a C-speed AND)."""
        both = int.from_bytes(has, "little") & int.from_bytes(self._in_pool, "little")
        return both.to_bytes(self._n, "little")

    def _sample(self, pieces: _IndexedSet, state: _Peer, k: int) -> list[int] | None:
        """Up to ``k`` uniformly chosen members of ``pieces`` that the peer holds, or None
        when rejection sampling gave up (the caller then scans exactly)."""
        if state.has is None:
            if len(pieces) <= k:
                return list(pieces.items)
            return self._rng.sample(pieces.items, k)
        has = state.has
        items = pieces.items
        size = len(items)
        chosen: list[int] = []
        seen: set[int] = set()
        rand = self._rng.random
        for _ in range(8 + 4 * k):
            piece = items[int(rand() * size)]
            if has[piece] and piece not in seen:
                seen.add(piece)
                chosen.append(piece)
                if len(chosen) == k:
                    return chosen
        return None

    def _pick_uniform(self, peer: Hashable, state: _Peer, k: int, out: list[int]) -> int:
        if not self._pool:
            return 0
        got = self._sample(self._pool, state, k)
        if got is None:
            assert state.has is not None
            candidates = list(_positions(self._both(state.has)))
            got = candidates if len(candidates) <= k else self._rng.sample(candidates, k)
        for piece in got:
            self._take(piece, peer, state, out)
        return len(got)

    def _pick_rarest(self, peer: Hashable, state: _Peer, need: int, out: list[int]) -> None:
        has = state.has
        grouped = self._groups is not None
        scanned = 0
        # A partial peer's own pieces have availability >= 1; a seeder serves level 0 too.
        level = 0 if has is None else 1
        while need and level < len(self._buckets):
            again = False
            for tier_index, tier in enumerate(self._buckets[level]):
                if not tier.items:
                    continue
                # Taking from an untouched group starts it: its other pieces at this level
                # join the preferred tier and come next, so take one and look again.
                follow = grouped and tier_index == _REST
                got = self._sample(tier, state, 1 if follow else need)
                if got is None:
                    assert has is not None
                    if scanned + len(tier) > state.count:
                        self._pick_rarest_by_scan(peer, state, need, out)
                        return
                    scanned += len(tier)
                    candidates = [piece for piece in tier.items if has[piece]]
                    need -= self._take_class(peer, state, candidates, need, out, follow=follow)
                else:
                    for piece in got:
                        self._take(piece, peer, state, out)
                    need -= len(got)
                    again = follow
                if not need or again:
                    break
            if not again:
                level += 1

    def _pick_rarest_by_scan(self, peer: Hashable, state: _Peer, need: int, out: list[int]) -> None:
        """One pass over the pool pieces the peer holds, best (level, tier) classes first."""
        assert state.has is not None
        classes: dict[int, list[int]] = {}
        for piece in _positions(self._both(state.has)):
            key = 2 * self._avail[piece] + self._tier(piece)
            classes.setdefault(key, []).append(piece)
        grouped = self._groups is not None
        for key in sorted(classes):
            follow = grouped and key % 2 == _REST
            need -= self._take_class(peer, state, classes[key], need, out, follow=follow)
            if not need:
                return

    def _take_class(
        self,
        peer: Hashable,
        state: _Peer,
        candidates: list[int],
        need: int,
        out: list[int],
        *,
        follow: bool,
    ) -> int:
        """Take up to ``need`` of equally ranked ``candidates`` at random; with ``follow``
        (untouched groups), each piece taken is followed by the rest of its group's
        candidates, which its taking promoted to the preferred tier."""
        if not follow:
            chosen = candidates if len(candidates) <= need else self._rng.sample(candidates, need)
            for piece in chosen:
                self._take(piece, peer, state, out)
            return len(chosen)
        assert self._groups is not None
        groups = self._groups
        members: dict[int, list[int]] = {}
        for piece in candidates:
            members.setdefault(groups[piece], []).append(piece)
        order = list(candidates)
        self._rng.shuffle(order)
        taken = 0
        for first in order:
            if taken == need:
                break
            if not self._in_pool[first]:
                continue
            rest = [piece for piece in members[groups[first]] if piece != first]
            self._rng.shuffle(rest)
            for piece in [first, *rest][: need - taken]:
                self._take(piece, peer, state, out)
                taken += 1
        return taken

    def _pick_sequential(self, peer: Hashable, state: _Peer, need: int, out: list[int]) -> None:
        bitmap = self._in_pool if state.has is None else self._both(state.has)
        self._seq_hint = self._in_pool.find(1, self._seq_hint)
        if self._seq_hint == -1:
            self._seq_hint = self._n
            return
        for piece in _positions(bitmap, self._seq_hint):
            self._take(piece, peer, state, out)
            need -= 1
            if not need:
                return

    def _pick_duplicates(self, peer: Hashable, state: _Peer, need: int, out: list[int]) -> None:
        has = state.has
        candidates = [
            (len(requesters), -self._requested_at[piece], piece)
            for piece, requesters in self._requests.items()
            if peer not in requesters
            and (has is None or has[piece])
            and (self._max_requesters is None or len(requesters) < self._max_requesters)
        ]
        candidates.sort()
        for _, _, piece in candidates[:need]:
            self._requests[piece].add(peer)
            state.outstanding.add(piece)
            out.append(piece)
