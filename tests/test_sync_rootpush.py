"""What a member pushes after a FolderRoot (sync/rootpush.py): exactly the index nodes a
member in step with the root before asks for, in the order it asks, within the budget."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.content.tree import Child
from p2pfs.ids import ContentHash
from p2pfs.sync.records import EMPTY_INDEX, INDEX_TREE, IndexLeaf, build_index, remote_changes
from p2pfs.sync.rootpush import index_push

UNLIMITED = 1 << 40


def random_leaves(rng: random.Random, count: int) -> dict[bytes, IndexLeaf]:
    leaves = (IndexLeaf(rng.randbytes(32), ContentHash(rng.randbytes(32))) for _ in range(count))
    return {leaf.path_key: leaf for leaf in leaves}


def built(leaves: dict[bytes, IndexLeaf], into: dict[ContentHash, bytes]) -> Child:
    return build_index(leaves.values(), lambda h, e, _n: into.__setitem__(h, e))


class PushedOnly:
    """A member's nodes as a client reaches them through the push alone."""

    def __init__(self, pushed: list[bytes]) -> None:
        self.nodes = {INDEX_TREE.node_hash(node): node for node in pushed}
        self.asked: list[ContentHash] = []

    def __call__(self, hashes: list[ContentHash]) -> list[bytes]:
        self.asked += hashes
        return [self.nodes[h] for h in hashes]  # KeyError: the push lacked one


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 600),
    st.integers(0, 40),
    st.integers(0, 5),
    st.integers(0, 2**32),
)
def test_a_member_in_step_needs_nothing_but_the_push(
    before: int, edits: int, added: int, seed: int
) -> None:
    rng = random.Random(seed)
    old = random_leaves(rng, before)
    new = dict(old)
    for key in rng.sample(sorted(old), min(edits, len(old))):
        new[key] = IndexLeaf(key, ContentHash(rng.randbytes(32)))
    new.update(random_leaves(rng, added))
    for key in rng.sample(sorted(new), min(1, len(new), edits)):
        del new[key]  # a delete, too
    held: dict[ContentHash, bytes] = {}
    previous, root = built(old, held), built(new, held)
    member_nodes: dict[ContentHash, bytes] = {}
    assert built(old, member_nodes) == previous

    push = index_push(previous, root, held.get, UNLIMITED)

    pushed = PushedOnly(push.nodes)
    changes = remote_changes(previous, member_nodes.__getitem__, root, pushed)
    expected = sorted(leaf for key, leaf in new.items() if old.get(key) != leaf)
    assert list(changes) == expected
    # Nothing pushed in vain, in the order asked, and the records at exactly those leaves.
    assert pushed.asked == [INDEX_TREE.node_hash(node) for node in push.nodes]
    assert sorted(push.record_hashes) == sorted(leaf.record_hash for leaf in expected)
    assert push.size == sum(map(len, push.nodes))
    if root == previous:
        assert not push.nodes and not push.record_hashes


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 800), st.integers(0, 2**32))
def test_a_first_root_is_pushed_from_the_top(count: int, seed: int) -> None:
    rng = random.Random(seed)
    leaves = random_leaves(rng, count)
    held: dict[ContentHash, bytes] = {}
    root = built(leaves, held)
    push = index_push(None, root, held.get, UNLIMITED)
    assert index_push(EMPTY_INDEX, root, held.get, UNLIMITED) == push
    pushed = PushedOnly(push.nodes)
    assert list(remote_changes(EMPTY_INDEX, {}.__getitem__, root, pushed)) == sorted(
        leaves.values()
    )
    assert len(push.nodes) == len(held)
    assert sorted(push.record_hashes) == sorted(leaf.record_hash for leaf in leaves.values())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 800), st.integers(0, 20_000), st.booleans(), st.integers(0, 2**32))
def test_a_push_stays_within_its_budget_and_keeps_the_order(
    count: int, budget: int, first: bool, seed: int
) -> None:
    rng = random.Random(seed)
    old = random_leaves(rng, count)
    new = dict(old)
    for key in rng.sample(sorted(old), min(30, len(old))):
        new[key] = IndexLeaf(key, ContentHash(rng.randbytes(32)))
    held: dict[ContentHash, bytes] = {}
    previous, root = built(old, held), built(new, held)
    start = None if first else previous
    whole = index_push(start, root, held.get, UNLIMITED)
    part = index_push(start, root, held.get, budget)
    assert part.size <= budget
    assert part.nodes == whole.nodes[: len(part.nodes)]
    if part.nodes == whole.nodes:
        assert part.record_hashes == whole.record_hashes
    elif not first:
        assert not part.record_hashes  # a diff cut short has not found its leaves


def test_nothing_is_pushed_once_the_root_sent_before_is_gone() -> None:
    rng = random.Random(5)
    old = random_leaves(rng, 300)
    new = dict(old)
    key = sorted(old)[7]
    new[key] = IndexLeaf(key, ContentHash(rng.randbytes(32)))
    gone: dict[ContentHash, bytes] = {}
    previous = built(old, gone)
    held: dict[ContentHash, bytes] = {}
    root = built(new, held)
    assert previous != root
    push = index_push(previous, root, held.get, UNLIMITED)
    assert not push.nodes and not push.record_hashes
