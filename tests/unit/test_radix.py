"""Unit tests for slmserve.cache.radix: every path and every error path, one behaviour each."""

from __future__ import annotations

import numpy as np
import pytest

from slmserve.cache.kv_pool import SlotAllocator
from slmserve.cache.radix import InsertResult, MatchResult, RadixCache, RadixNode


def make(num_slots: int = 64) -> RadixCache:
    return RadixCache(SlotAllocator(num_slots))


def put(cache: RadixCache, tokens: list[int]) -> InsertResult:
    """Insert like a request does: reuse the matched slots, allocate the tail."""
    m = cache.match_prefix(tokens)
    tail = cache.allocator.alloc(len(tokens) - m.length)
    return cache.insert(tokens, np.concatenate([m.slots, tail]))


def snapshot(cache: RadixCache) -> list[tuple]:
    """Everything observable about the tree's shape, locks and LRU state."""
    out = []
    stack = [cache.root]
    while stack:
        node = stack.pop()
        out.append(
            (id(node), node.key.tolist(), node.slots.tolist(), node.lock_ref, node.last_access)
        )
        stack.extend(node.children.values())
    return [*sorted(out), len(cache._heap), cache._clock]


# ---------------------------------------------------------------------- empty / basics


def test_empty_cache() -> None:
    cache = make()
    m = cache.match_prefix([1, 2, 3])
    assert isinstance(m, MatchResult)
    assert (m.length, m.node, m.slots.tolist()) == (0, cache.root, [])
    assert m.slots.dtype == np.int64
    assert (cache.evictable_size, cache.protected_size, cache.total_size) == (0, 0, 0)
    assert cache.tree_slots().tolist() == []
    assert cache.evict(10) == 0
    cache.check_integrity()


def test_insert_empty_sequence_is_a_noop() -> None:
    cache = make()
    r = cache.insert([], [])
    assert (r.prefix_len, r.node, r.slots.tolist()) == (0, cache.root, [])
    assert cache.total_size == 0
    assert cache.match_prefix([]).node is cache.root


def test_insert_then_match_prefixes() -> None:
    cache = make()
    alloc = cache.allocator
    slots = alloc.alloc(5)
    r = cache.insert(np.array([1, 2, 3, 4, 5]), slots)
    assert r.prefix_len == 0
    assert r.slots.tolist() == slots.tolist()
    assert r.node.key.tolist() == [1, 2, 3, 4, 5]
    assert cache.evictable_size == 5
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == slots.tolist()
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7]).length == 5
    assert cache.match_prefix([2, 2]).length == 0
    m = cache.match_prefix([1, 2, 9])
    assert (m.length, m.slots.tolist()) == (2, slots[:2].tolist())
    cache.check_integrity()


def test_accepts_lists_and_numpy_ints() -> None:
    cache = make()
    alloc = cache.allocator
    slots = alloc.alloc(2)
    cache.insert([np.int32(7), 8], slots.tolist())
    assert cache.match_prefix((7, 8)).slots.tolist() == slots.tolist()
    cache.check_integrity()


def test_match_result_across_several_nodes_concatenates_slots() -> None:
    cache = make()
    a = put(cache, [1, 2, 3])
    b = put(cache, [1, 2, 3, 4, 5])
    c = put(cache, [1, 2, 3, 4, 5, 6])
    m = cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert m.length == 6
    assert m.node is c.node
    assert m.slots.tolist() == [*a.slots.tolist(), *b.slots[3:].tolist(), *c.slots[5:].tolist()]
    cache.check_integrity()


def test_match_prefix_does_not_mutate() -> None:
    cache = make()
    put(cache, [1, 2, 3, 4])
    put(cache, [1, 2, 7])
    before = snapshot(cache)
    for q in ([1, 2, 3], [1, 2, 7, 7], [1], [5], [1, 2, 3, 4, 5]):
        cache.match_prefix(q)
    assert snapshot(cache) == before


def test_partial_edge_match_returns_the_partly_matched_node() -> None:
    cache = make()
    r = put(cache, [1, 2, 3, 4, 5])
    m = cache.match_prefix([1, 2, 3, 9])
    assert m.length == 3
    assert m.node is r.node
    assert m.slots.tolist() == r.slots[:3].tolist()
    cache.lock(m.node)  # pins the whole edge, beyond the matched part
    assert (cache.protected_size, cache.evictable_size) == (5, 0)
    assert cache.evict(100) == 0
    cache.unlock(m.node)
    cache.check_integrity()


def test_returned_slots_are_read_only_and_tree_copies_inputs() -> None:
    cache = make()
    alloc = cache.allocator
    tokens = np.array([1, 2, 3])
    slots = alloc.alloc(3)
    r = cache.insert(tokens, slots)
    tokens[:] = 9  # the caller reuses its buffers
    slots[:] = 0
    m = cache.match_prefix([1, 2, 3])
    assert m.length == 3
    assert m.slots.tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        m.slots[0] = 5
    with pytest.raises(ValueError):
        r.slots[0] = 5
    cache.check_integrity()


# --------------------------------------------------------------------------- insert


def test_insert_rejects_mismatched_slots_and_bad_shapes() -> None:
    cache = make()
    with pytest.raises(ValueError, match="one slot per token"):
        cache.insert([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="one slot per token"):
        cache.insert([], [0])
    with pytest.raises(ValueError, match="1-D"):
        cache.insert([[1, 2]], [[0, 1]])
    with pytest.raises(ValueError, match="1-D"):
        cache.match_prefix(np.zeros((2, 2), dtype=np.int64))
    assert cache.total_size == 0


def test_split_keeps_handles_valid_and_copies_lock_and_time() -> None:
    cache = make()
    r = put(cache, [1, 2, 3, 4, 5])
    leaf = r.node
    cache.lock(leaf)
    t_lock = leaf.last_access
    r2 = put(cache, [1, 2, 9])  # splits [1..5] after 2
    top = leaf.parent
    assert top is not None and top is not cache.root
    assert top.key.tolist() == [1, 2]
    assert leaf.key.tolist() == [3, 4, 5]
    assert leaf.slots.tolist() == r.slots[2:].tolist()
    assert top.lock_ref == leaf.lock_ref == 1
    assert leaf.last_access == t_lock  # the tail was not used by the second insert
    assert top.last_access > t_lock  # the head was
    assert r2.node.parent is top
    assert cache.root.children[1] is top
    assert (cache.protected_size, cache.evictable_size) == (5, 1)
    cache.check_integrity()
    cache.unlock(leaf)  # the old handle still unlocks the whole path
    assert (top.lock_ref, leaf.lock_ref) == (0, 0)
    assert (cache.protected_size, cache.evictable_size) == (0, 6)
    cache.check_integrity()


def test_split_of_unlocked_node_takes_its_time() -> None:
    cache = make()
    r = put(cache, [1, 2, 3, 4])
    t = r.node.last_access
    top = cache._split(r.node, 2)
    assert (top.last_access, top.lock_ref) == (t, 0)
    cache.check_integrity()


def test_insert_of_present_sequence_adds_nothing() -> None:
    cache = make()
    alloc = cache.allocator
    r = put(cache, [1, 2, 3, 4])
    free = alloc.num_free
    again = cache.insert([1, 2, 3, 4], r.slots)
    assert again.prefix_len == 4
    assert again.node is r.node
    assert again.slots.tolist() == r.slots.tolist()
    assert (alloc.num_free, cache.total_size) == (free, 4)
    cache.check_integrity()


def test_insert_ending_inside_an_edge_splits_so_node_ends_there() -> None:
    cache = make()
    r = put(cache, [1, 2, 3, 4])
    sub = cache.insert([1, 2], r.slots[:2])
    assert sub.prefix_len == 2
    assert sub.node.key.tolist() == [1, 2]
    assert sub.node.children[3] is r.node
    assert cache.total_size == 4
    cache.check_integrity()


def test_insert_frees_duplicate_slots_of_the_cached_prefix() -> None:
    cache = make(16)
    alloc = cache.allocator
    first = put(cache, [1, 2, 3, 4])
    # A second request computed the same prompt with private slots (no reuse).
    private = alloc.alloc(5)
    r = cache.insert([1, 2, 3, 4, 5], private)
    assert r.prefix_len == 4
    assert r.slots.tolist() == [*first.slots.tolist(), private[4]]
    freed = set(alloc.free_slots().tolist())
    assert set(private[:4].tolist()) <= freed
    assert private[4] not in freed
    assert alloc.num_used == cache.total_size == 5
    cache.check_integrity()


def test_insert_frees_only_the_slots_that_differ() -> None:
    cache = make(16)
    alloc = cache.allocator
    put(cache, [1, 2])
    m = cache.match_prefix([1, 2, 3, 4])  # reuses 2 slots, computes 2 privately
    cache.lock(m.node)
    mine = np.concatenate([m.slots, alloc.alloc(2)])
    other = put(cache, [1, 2, 3])  # meanwhile someone cached token 3
    r = cache.insert([1, 2, 3, 4], mine)
    cache.unlock(m.node)
    assert r.prefix_len == 3
    assert r.slots.tolist() == [*other.slots.tolist(), mine[3]]
    assert mine[2] in alloc.free_slots()
    assert not np.isin(mine[[0, 1, 3]], alloc.free_slots()).any()
    assert alloc.num_used == cache.total_size == 4
    cache.check_integrity()


def test_insert_with_a_bad_duplicate_raises_and_adds_nothing() -> None:
    cache = make(16)
    alloc = cache.allocator
    first = put(cache, [1, 2])
    never_allocated = alloc.free_slots()[-1]
    tail = alloc.alloc(1)
    with pytest.raises(ValueError, match="double free"):
        cache.insert([1, 2, 3], [never_allocated, first.slots[1], tail[0]])
    assert cache.total_size == 2
    assert cache.match_prefix([1, 2, 3]).length == 2
    cache.check_integrity()


def test_insert_under_a_locked_leaf_adds_an_unlocked_leaf() -> None:
    cache = make()
    r = put(cache, [1, 2])
    cache.lock(r.node)
    r2 = put(cache, [1, 2, 3])
    assert r2.node.lock_ref == 0
    assert (cache.protected_size, cache.evictable_size) == (2, 1)
    assert cache.evict(10) == 1
    assert cache.match_prefix([1, 2, 3]).length == 2
    cache.check_integrity()


# ----------------------------------------------------------------------------- locks


def test_lock_moves_tokens_between_evictable_and_protected() -> None:
    cache = make()
    put(cache, [1, 2, 3])
    r = put(cache, [1, 2, 3, 4, 5])
    cache.lock(r.node)
    cache.lock(r.node)
    assert (cache.protected_size, cache.evictable_size) == (5, 0)
    assert r.node.lock_ref == 2 and r.node.parent.lock_ref == 2
    cache.unlock(r.node)
    assert (cache.protected_size, cache.evictable_size) == (5, 0)
    cache.unlock(r.node)
    assert (cache.protected_size, cache.evictable_size) == (0, 5)
    cache.check_integrity()


def test_lock_on_a_child_pins_the_parent_too() -> None:
    cache = make()
    a = put(cache, [1, 2])
    b = put(cache, [1, 2, 3])
    c = put(cache, [1, 2, 4])
    cache.lock(b.node)
    assert cache.evict(100) == 1  # only the sibling c
    assert c.node.parent is None
    assert a.node.parent is cache.root and a.node.lock_ref == 1
    cache.unlock(b.node)
    cache.check_integrity()


def test_unlock_underflow_raises() -> None:
    cache = make()
    r = put(cache, [1, 2])
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(r.node)
    cache.lock(r.node)
    cache.unlock(r.node)
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(r.node)
    assert cache.evictable_size == 2
    cache.check_integrity()


def test_root_lock_and_unlock_are_noops() -> None:
    cache = make()
    cache.lock(cache.root)
    cache.unlock(cache.root)
    cache.unlock(cache.root)
    assert cache.root.lock_ref == 0
    cache.check_integrity()


def test_locking_an_evicted_node_raises() -> None:
    cache = make()
    r = put(cache, [1, 2])
    assert cache.evict(2) == 2
    with pytest.raises(ValueError, match="evicted"):
        cache.lock(r.node)
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(r.node)
    cache.check_integrity()


def test_lock_touches_the_path() -> None:
    cache = make()
    r = put(cache, [1, 2, 3])
    t0 = r.node.last_access
    cache.lock(r.node)
    assert r.node.last_access > t0
    cache.unlock(r.node)


# -------------------------------------------------------------------------- eviction


def test_evict_is_lru_by_insert() -> None:
    cache = make()
    a, b, c = put(cache, [1, 1]), put(cache, [2, 2]), put(cache, [3, 3])
    assert cache.evict(1) == 2
    assert a.node.parent is None and b.node.parent is not None
    assert cache.evict(2) == 2
    assert b.node.parent is None and c.node.parent is not None
    assert cache.match_prefix([3, 3]).length == 2
    cache.check_integrity()


def test_evict_order_follows_lock_and_reinsert_touches() -> None:
    cache = make()
    a, b, c = put(cache, [1, 1]), put(cache, [2, 2]), put(cache, [3, 3])
    cache.lock(a.node)  # a used most recently (lock)
    cache.unlock(a.node)
    cache.insert([2, 2], b.slots)  # then b (insert of a present sequence)
    assert cache.evict(2) == 2
    assert c.node.parent is None
    assert cache.evict(2) == 2
    assert a.node.parent is None
    assert b.node.parent is not None
    cache.check_integrity()


def test_match_does_not_refresh_lru() -> None:
    cache = make()
    a, b = put(cache, [1, 1]), put(cache, [2, 2])
    cache.match_prefix([1, 1])
    cache.evict(1)
    assert a.node.parent is None and b.node.parent is not None


def test_evict_frees_whole_leaves_and_returns_count() -> None:
    cache = make()
    alloc = cache.allocator
    put(cache, [1, 2, 3, 4, 5])
    assert cache.evict(1) == 5
    assert alloc.num_free == alloc.num_slots
    assert cache.total_size == 0


def test_evict_walks_up_to_parents_that_become_leaves() -> None:
    cache = make()
    alloc = cache.allocator
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 3, 4, 5])
    put(cache, [1, 2, 3, 6])
    assert cache.total_size == 6
    assert cache.evict(100) == 6
    assert cache.root.children == {}
    assert alloc.num_free == alloc.num_slots
    cache.check_integrity()


def test_evict_parent_after_children_in_lru_order() -> None:
    cache = make()
    parent = put(cache, [1, 2])
    put(cache, [1, 2, 3])
    other = put(cache, [5])  # newer than the [1, 2] path
    assert cache.evict(2) == 3  # the leaf [3], then its parent [1, 2] (older than [5])
    assert parent.node.parent is None and other.node.parent is not None
    cache.check_integrity()


def test_locked_nodes_survive_evict() -> None:
    cache = make()
    keep = put(cache, [1, 2, 3])
    put(cache, [1, 2, 3, 4])
    put(cache, [7, 7])
    cache.lock(keep.node)
    assert cache.evict(1000) == 3
    assert cache.match_prefix([1, 2, 3, 4]).length == 3
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == keep.slots.tolist()
    assert (cache.protected_size, cache.evictable_size) == (3, 0)
    cache.unlock(keep.node)
    assert cache.evict(1000) == 3
    cache.check_integrity()


def test_evict_zero_and_negative() -> None:
    cache = make()
    put(cache, [1])
    assert cache.evict(0) == 0
    assert cache.total_size == 1
    with pytest.raises(ValueError, match=">= 0"):
        cache.evict(-1)


def test_evict_skips_stale_heap_entries() -> None:
    cache = make()
    r = put(cache, [1, 2])
    for _ in range(5):  # every unlock re-queues the leaf with a new time
        cache.lock(r.node)
        cache.unlock(r.node)
    put(cache, [3])
    assert cache.evict(1) == 2
    assert r.node.parent is None
    assert cache.match_prefix([3]).length == 1
    cache.check_integrity()


def test_heap_stays_bounded_under_churn() -> None:
    cache = make()
    r = put(cache, [1, 2])
    for _ in range(1000):
        cache.lock(r.node)
        cache.unlock(r.node)
    assert len(cache._heap) <= 2 * len(cache._evictable) + 65
    cache.check_integrity()
    assert cache.evict(1) == 2


# ----------------------------------------------------------------------------- reset


def test_reset_frees_everything_and_invalidates_handles() -> None:
    cache = make()
    alloc = cache.allocator
    r = put(cache, [1, 2, 3])
    put(cache, [4])
    cache.reset()
    assert alloc.num_free == alloc.num_slots
    assert cache.total_size == 0
    assert cache.match_prefix([1, 2, 3]).length == 0
    with pytest.raises(ValueError):
        cache.lock(r.node)
    cache.check_integrity()
    put(cache, [1, 2, 3])  # usable again
    cache.check_integrity()


def test_reset_refuses_while_locked() -> None:
    cache = make()
    r = put(cache, [1, 2, 3])
    cache.lock(r.node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    assert cache.total_size == 3


# ------------------------------------------------------------------------- integrity


def test_tree_slots_lists_every_node() -> None:
    cache = make()
    a = put(cache, [1, 2, 3])
    b = put(cache, [1, 2, 4])
    assert sorted(cache.tree_slots().tolist()) == sorted({*a.slots.tolist(), *b.slots.tolist()})


def _corrupted_caches():
    """(description, mutation) pairs; each mutation breaks exactly one invariant."""

    def sizes(c: RadixCache, n: RadixNode) -> None:
        c._evictable_size += 1

    def lock_ref(c: RadixCache, n: RadixNode) -> None:
        n.parent.lock_ref = 0
        n.lock_ref = 1

    def freed_behind_back(c: RadixCache, n: RadixNode) -> None:
        c.allocator.free(n.slots[:1])

    def twice(c: RadixCache, n: RadixNode) -> None:
        n.slots = n.parent.slots[: len(n.slots)].copy()

    def wrong_child_key(c: RadixCache, n: RadixNode) -> None:
        n.parent.children[99] = n.parent.children.pop(int(n.key[0]))

    def parent_pointer(c: RadixCache, n: RadixNode) -> None:
        n.parent = c.root

    def leaf_set(c: RadixCache, n: RadixNode) -> None:
        del c._evictable[n]

    def heap_entry(c: RadixCache, n: RadixNode) -> None:
        c._heap = [e for e in c._heap if e[2] is not n]

    def lru_time(c: RadixCache, n: RadixNode) -> None:
        n.last_access = n.parent.last_access + 10

    def key_bytes(c: RadixCache, n: RadixNode) -> None:
        n._kb = b"\0" * len(n._kb)

    def out_of_range(c: RadixCache, n: RadixNode) -> None:
        n.slots = np.full(len(n.slots), 10_000, dtype=np.int64)

    return [
        ("sizes", sizes),
        ("lock_ref", lock_ref),
        ("also free", freed_behind_back),
        ("held twice", twice),
        ("filed under", wrong_child_key),
        ("point back", parent_pointer),
        ("leaf set", leaf_set),
        ("heap entry", heap_entry),
        ("used after", lru_time),
        ("disagree", key_bytes),
        ("range", out_of_range),
    ]


@pytest.mark.parametrize(("message", "mutate"), _corrupted_caches())
def test_check_integrity_catches(message: str, mutate) -> None:
    cache = make()
    put(cache, [1, 2, 3])
    leaf = put(cache, [1, 2, 3, 4, 5]).node
    put(cache, [9])
    cache.check_integrity()
    mutate(cache, leaf)
    with pytest.raises(RuntimeError, match=message):
        cache.check_integrity()
