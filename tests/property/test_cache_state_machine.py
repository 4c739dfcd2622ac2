"""Stateful property test: SlotAllocator + RadixCache driven the way the engine drives them.

Requests match, lock their prefix, allocate private slots for the uncached tail, insert (the
cache frees duplicates; the request switches to the tree's slots), move their lock to the
inserted node and release it; aborted requests free their private tail. Independent private
allocations and evictions interleave. Tokens come from a 4-letter alphabet with lengths up to
12, so prefixes collide and edges split constantly.

The reference model is ``model``: every non-empty token prefix the tree should hold, mapped to
the slot that holds that token's KV. It grows on insert from what the request itself knows,
and shrinks on eviction by the slots the allocator got back, never by asking the tree. After
every step: slots in the tree, slots held privately and free slots partition the pool; the
tree's content equals the model (brute-force longest prefix and exact slots for every sequence
seen); locked prefixes are intact; sizes match an independent recount; ``check_integrity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from slmserve.cache.kv_pool import KVCacheExhausted, SlotAllocator
from slmserve.cache.radix import Mark, RadixCache, RadixNode
from slmserve.cache.tracker import PrefixTracker

NUM_SLOTS = 64
MAX_LEN = 12

settings.register_profile(
    "cache-state-machine",
    max_examples=500,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

token_seqs = st.lists(st.integers(0, 3), max_size=MAX_LEN).map(tuple)


@dataclass
class Request:
    tokens: tuple[int, ...]
    node: RadixNode  # the handle this request holds one lock on
    slots: np.ndarray  # slots for tokens: tree-owned [:n_tree], private [n_tree:]
    n_tree: int


def nodes_of(cache: RadixCache) -> list[RadixNode]:
    out, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.alloc = SlotAllocator(NUM_SLOTS)
        self.cache = RadixCache(self.alloc)
        self.model: dict[tuple[int, ...], int] = {}
        self.private: list[np.ndarray] = []
        self.running: list[Request] = []
        self.seen: set[tuple[int, ...]] = set()
        self.marks: dict[tuple[int, ...], Mark] = {}
        self.tracker = PrefixTracker(self.cache)
        self.tracked: dict[tuple[int, ...], int] = {}  # last length the tracker reported

    # ------------------------------------------------------------------ reference

    def ref_len(self, tokens: tuple[int, ...]) -> int:
        n = 0
        while n < len(tokens) and tokens[: n + 1] in self.model:
            n += 1
        return n

    def ref_slots(self, tokens: tuple[int, ...], n: int) -> list[int]:
        return [self.model[tokens[: i + 1]] for i in range(n)]

    def check_match(self, tokens: tuple[int, ...]) -> None:
        m = self.cache.match_prefix(np.array(tokens, dtype=np.int64))
        n = self.ref_len(tokens)
        assert m.length == n, (tokens, m.length, n)
        assert m.slots.tolist() == self.ref_slots(tokens, n)
        if n == 0:
            assert m.node is self.cache.root
        else:
            assert m.node.parent is not None  # a live node, not an evicted one

    def do_evict(self, n: int) -> int:
        """Evict and update the model from the allocator's view, checking LRU and bounds."""
        cache = self.cache
        times = {node: node.last_access for node in nodes_of(cache)}
        evictable = cache.evictable_size
        free_before = set(self.alloc.free_slots().tolist())
        freed = cache.evict(n)
        newly_free = set(self.alloc.free_slots().tolist()) - free_before
        assert len(newly_free) == freed
        if n >= evictable:
            assert freed == evictable  # everything unlocked goes, leaves first
        else:
            assert n <= freed <= evictable
            assert freed < n + MAX_LEN  # stops right after the leaf that crossed n
        gone = [p for p, s in self.model.items() if s in newly_free]
        assert len(gone) == freed
        for p in gone:
            del self.model[p]
        for p in self.model:  # what is left is still prefix-closed
            assert len(p) == 1 or p[:-1] in self.model
        # LRU: nothing evicted was used after any unlocked leaf that survived.
        evicted = [t for node, t in times.items() if node.parent is None]
        survivors = [
            node.last_access for node in nodes_of(cache) if node.lock_ref == 0 and not node.children
        ]
        if evicted and survivors:
            assert max(evicted) <= min(survivors)
        return freed

    # ---------------------------------------------------------------------- rules

    @rule(tokens=token_seqs)
    def match(self, tokens: tuple[int, ...]) -> None:
        self.seen.add(tokens)
        before = [(id(x), x.lock_ref, x.last_access, len(x.key)) for x in nodes_of(self.cache)]
        self.check_match(tokens)
        after = [(id(x), x.lock_ref, x.last_access, len(x.key)) for x in nodes_of(self.cache)]
        assert before == after  # match never splits or touches

    @rule(tokens=token_seqs)
    def match_and_split(self, tokens: tuple[int, ...]) -> None:
        """Admission's match: same answer, and the node ends exactly where the match does."""
        self.seen.add(tokens)
        m = self.cache.match_prefix(np.array(tokens, dtype=np.int64), split=True)
        assert m.length == self.ref_len(tokens)
        assert sum(len(node.key) for node in self._path(m.node)) == m.length

    def pick(self, tokens: tuple[int, ...], base: int, cut: int) -> tuple[int, ...]:
        """Half the time, extend a prefix of a sequence seen before (shared prefixes)."""
        if self.seen and base % 2:
            old = sorted(self.seen)[base % len(self.seen)]
            tokens = (old[:cut] + tokens)[:MAX_LEN]
        self.seen.add(tokens)
        return tokens

    @rule(
        tokens=token_seqs,
        base=st.integers(0, 10**6),
        cut=st.integers(0, MAX_LEN),
        stage=st.sampled_from(["start", "commit", "finish"]),
    )
    def start_request(self, tokens: tuple[int, ...], base: int, cut: int, stage: str) -> None:
        """Admit a request (match, lock, allocate the tail); maybe commit and finish it too."""
        tokens = self.pick(tokens, base, cut)
        m = self.cache.match_prefix(tokens)
        assert m.length == self.ref_len(tokens)
        self.cache.lock(m.node)
        if m.length:
            self.assert_most_recent(self._path(m.node))
        need = len(tokens) - m.length
        if need > self.alloc.num_free:
            self.do_evict(need - self.alloc.num_free)
        if need > self.alloc.num_free:
            self.cache.unlock(m.node)  # does not fit even after evicting: not admitted
            return
        tail = self.alloc.alloc(need)
        slots = np.concatenate([m.slots, tail])
        self.running.append(Request(tokens, m.node, slots, m.length))
        if stage != "start":
            self.commit(len(self.running) - 1)
        if stage == "finish":
            self.release(len(self.running) - 1)

    @rule(tokens=token_seqs, base=st.integers(0, 10**6), cut=st.integers(0, MAX_LEN))
    def insert_unlocked(self, tokens: tuple[int, ...], base: int, cut: int) -> None:
        """A bare insert, no lock before or after (room is made first, so the match cannot
        go stale). Unlike a request's commit, no lock/unlock follows to tidy the LRU state."""
        tokens = self.pick(tokens, base, cut)
        if len(tokens) > self.alloc.num_free:
            self.do_evict(len(tokens) - self.alloc.num_free)
        m = self.cache.match_prefix(tokens)
        need = len(tokens) - m.length
        if need > self.alloc.num_free:
            return
        slots = np.concatenate([m.slots, self.alloc.alloc(need)])
        self.insert_checked(Request(tokens, self.cache.root, slots, m.length))

    def insert_checked(self, req: Request) -> RadixNode:
        """Insert a request's tokens, check the result against the model and update it."""
        cached = self.ref_len(req.tokens)
        assert cached >= req.n_tree  # a lock kept the matched prefix in the tree
        tokens = np.array(req.tokens, dtype=np.int64)
        slots = req.slots.copy()
        r = self.cache.insert(tokens, slots)
        tokens[:] = 7  # the caller reuses its buffers: the tree must have copied them
        slots[:] = 0
        assert r.prefix_len == cached
        n = len(req.tokens)
        assert r.slots.tolist() == self.ref_slots(req.tokens, cached) + req.slots[cached:].tolist()
        dup = req.slots[req.n_tree : cached]  # private copies of now-cached tokens
        assert np.isin(dup, self.alloc.free_slots()).all()
        for j in range(cached, n):
            self.model[req.tokens[: j + 1]] = int(req.slots[j])
        if n:
            path = self._path(r.node)
            assert sum(len(x.key) for x in path) == n  # ends exactly at n
            self.assert_most_recent(path)
        else:
            assert r.node is self.cache.root
        return r

    def assert_most_recent(self, path: list[RadixNode]) -> None:
        """insert and lock are uses: the whole path must now be the newest in the tree."""
        newest = max(x.last_access for x in nodes_of(self.cache))
        assert all(x.last_access == newest for x in path)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 10**6))
    def commit(self, i: int) -> None:
        """Insert a request's prompt; it switches to the tree's slots and moves its lock."""
        req = self.running[i % len(self.running)]
        r = self.insert_checked(req)
        self.cache.lock(r.node)
        self.cache.unlock(req.node)
        req.node, req.slots, req.n_tree = r.node, r.slots, len(req.tokens)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 10**6))
    def release(self, i: int) -> None:
        """Finish (if committed) or abort (free the private tail) and drop the lock."""
        req = self.running.pop(i % len(self.running))
        self.alloc.free(req.slots[req.n_tree :])
        self.cache.unlock(req.node)

    @rule(n=st.integers(0, 16))
    def evict(self, n: int) -> None:
        self.do_evict(n)

    @rule(n=st.integers(0, 30))
    def alloc_private(self, n: int) -> None:
        free = self.alloc.num_free
        if n > free:
            try:
                self.alloc.alloc(n)
            except KVCacheExhausted:
                assert self.alloc.num_free == free
                return
            raise AssertionError("alloc beyond the free count did not raise")
        self.private.append(self.alloc.alloc(n))

    @precondition(lambda self: self.private)
    @rule(i=st.integers(0, 10**6))
    def free_private(self, i: int) -> None:
        self.alloc.free(self.private.pop(i % len(self.private)))

    @precondition(lambda self: not self.running and self.cache.total_size > 40)
    @rule()
    def reset(self) -> None:
        self.cache.reset()
        self.model.clear()

    # ----------------------------------------------------------------- invariants

    def _path(self, node: RadixNode) -> list[RadixNode]:
        out = []
        while node is not self.cache.root:
            out.append(node)
            assert node.parent is not None, "a locked or returned node was evicted"
            node = node.parent
        return out

    @invariant()
    def slots_partition_the_pool(self) -> None:
        tree = self.cache.tree_slots().tolist()
        private = [s for batch in self.private for s in batch.tolist()]
        private += [s for r in self.running for s in r.slots[r.n_tree :].tolist()]
        free = self.alloc.free_slots().tolist()
        everything = tree + private + free
        assert len(everything) == NUM_SLOTS, (len(tree), len(private), len(free))
        assert set(everything) == set(range(NUM_SLOTS))
        assert sorted(tree) == sorted(self.model.values())

    @invariant()
    def tree_matches_the_model(self) -> None:
        assert self.cache.total_size == len(self.model)
        for tokens in self.seen:
            self.check_match(tokens)
            length, self.marks[tokens] = self.cache.match_length(tokens, self.marks.get(tokens))
            assert length == self.ref_len(tokens), (tokens, length)
            if tokens not in self.tracked:  # the engine's waiting queue: tracked from arrival
                self.tracker.add(tokens, np.array(tokens, dtype=np.int64))
                self.tracked[tokens] = -1
        # The tracker re-matches only what the tree's changes could affect; every length it
        # last reported must still be exact.
        self.tracked.update(self.tracker.refresh())
        for tokens, length in self.tracked.items():
            assert length == self.ref_len(tokens), (tokens, length)
        for tokens in self.model:
            self.check_match(tokens)

    @invariant()
    def locks_hold(self) -> None:
        pinned: set[int] = set()
        for req in self.running:
            path = self._path(req.node)  # asserts the whole path is still attached
            assert all(node.lock_ref >= 1 for node in path)
            pinned.update(id(node) for node in path)
            held = req.slots[: req.n_tree].tolist()
            assert held == self.ref_slots(req.tokens, req.n_tree)
        by_id = {id(node): node for node in nodes_of(self.cache)}
        protected = sum(len(by_id[i].key) for i in pinned)
        assert self.cache.protected_size == protected
        assert self.cache.evictable_size == len(self.model) - protected

    @invariant()
    def integrity(self) -> None:
        self.cache.check_integrity()

    def teardown(self) -> None:
        for req in self.running:
            self.cache.unlock(req.node)
        self.cache.check_integrity()


CacheMachine.TestCase.settings = settings.get_profile("cache-state-machine")
TestCacheStateMachine = CacheMachine.TestCase
