"""PrefixTracker: exact lengths, re-matching only what a change can affect."""

from __future__ import annotations

import numpy as np

from slmserve.cache.kv_pool import SlotAllocator
from slmserve.cache.radix import RadixCache
from slmserve.cache.tracker import PrefixTracker


def arr(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int64)


def insert(cache: RadixCache, tokens: np.ndarray) -> None:
    cached = cache.match_prefix(tokens).slots
    cache.insert(tokens, np.concatenate([cached, cache.allocator.alloc(len(tokens) - len(cached))]))


def test_new_child_rematches_only_the_keys_that_look_it_up() -> None:
    cache = RadixCache(SlotAllocator(64))
    insert(cache, arr(1, 2, 3))  # a shared "system prompt"
    tracker = PrefixTracker(cache)
    tracker.add("a", arr(1, 2, 3, 7, 7))
    tracker.add("b", arr(1, 2, 3, 8, 8))
    tracker.add("c", arr(1, 2, 3))  # ends exactly at the node
    assert dict(tracker.refresh()) == {"a": 3, "b": 3, "c": 3}
    assert tracker.refresh() == []  # nothing changed, nothing re-matched
    insert(cache, arr(1, 2, 3, 7, 9))  # a new child under the prompt, keyed by 7
    assert tracker.refresh() == [("a", 4)]
    cache.evict(64)  # everything goes: all three are affected
    assert dict(tracker.refresh()) == {"a": 0, "b": 0, "c": 0}


def test_split_and_reset_are_seen() -> None:
    cache = RadixCache(SlotAllocator(64))
    insert(cache, arr(1, 2, 3, 4))
    tracker = PrefixTracker(cache)
    tracker.add("x", arr(1, 2, 9))
    assert tracker.refresh() == [("x", 2)]  # partway into the edge [1, 2, 3, 4]
    insert(cache, arr(1, 2, 9, 9))  # splits that edge after [1, 2], adds [9, 9]
    assert tracker.refresh() == [("x", 3)]
    cache.reset()
    assert tracker.refresh() == [("x", 0)]


def test_discarded_keys_are_forgotten_and_re_added_keys_matched_afresh() -> None:
    cache = RadixCache(SlotAllocator(64))
    insert(cache, arr(5, 6))
    tracker = PrefixTracker(cache)
    tracker.add("k", arr(5, 6, 7))
    tracker.refresh()
    tracker.discard("k")
    tracker.discard("k")  # twice is fine
    assert len(tracker) == 0
    insert(cache, arr(5, 6, 7))
    assert tracker.refresh() == []
    tracker.add("k", arr(5, 6, 7, 8))
    assert tracker.refresh() == [("k", 3)]
