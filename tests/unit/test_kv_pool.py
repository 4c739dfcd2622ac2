"""Unit tests for slmserve.cache.kv_pool: the slot allocator, KVPool shapes and budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmserve.cache.kv_pool import KVCacheExhausted, KVPool, SlotAllocator, bytes_per_slot

# ------------------------------------------------------------------------ SlotAllocator


def test_allocator_rejects_empty_pool() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        SlotAllocator(0)


def test_alloc_hands_out_distinct_low_slots() -> None:
    a = SlotAllocator(10)
    first = a.alloc(3)
    assert first.dtype == np.int64
    assert first.tolist() == [0, 1, 2]
    second = a.alloc(4)
    assert not set(first.tolist()) & set(second.tolist())
    assert (a.num_free, a.num_used) == (3, 7)
    assert a.alloc(0).tolist() == []


def test_alloc_negative_raises() -> None:
    with pytest.raises(ValueError, match="negative"):
        SlotAllocator(4).alloc(-1)


def test_exhaustion_raises_with_a_clear_message_and_changes_nothing() -> None:
    a = SlotAllocator(8)
    a.alloc(6)
    with pytest.raises(KVCacheExhausted, match=r"asked for 3 slots, 2 of 8 free"):
        a.alloc(3)
    assert a.num_free == 2
    assert len(a.alloc(2)) == 2
    assert issubclass(KVCacheExhausted, RuntimeError)


def test_free_then_reuse_round_trip() -> None:
    a = SlotAllocator(6)
    s = a.alloc(6)
    a.free(s[::2])
    a.free(s[1::2].tolist())  # lists are fine too
    assert a.num_free == 6
    assert a.free_slots().tolist() == list(range(6))
    assert sorted(a.alloc(6).tolist()) == list(range(6))


def test_free_empty_is_a_noop() -> None:
    a = SlotAllocator(4)
    a.free(np.empty(0, dtype=np.int64))
    a.free([])
    assert a.num_free == 4


def test_double_free_raises_and_frees_nothing() -> None:
    a = SlotAllocator(8)
    s = a.alloc(4)
    a.free(s[:1])
    with pytest.raises(ValueError, match=r"double free of KV slots \[0\]"):
        a.free(s[:2])
    assert a.num_free == 5  # slot 1 was not freed by the failed call
    a.free(s[1:2])
    assert a.num_free == 6


def test_duplicate_within_one_free_raises_and_names_the_slot() -> None:
    a = SlotAllocator(8)
    a.alloc(5)
    with pytest.raises(ValueError, match=r"listed twice in one free: \[3\]"):
        a.free(np.array([1, 3, 2, 3]))
    assert a.num_free == 3
    assert not np.isin([1, 2, 3], a.free_slots()).any()


@pytest.mark.parametrize("bad", [[-1], [8], [0, 100]])
def test_out_of_range_free_raises(bad: list[int]) -> None:
    a = SlotAllocator(8)
    a.alloc(8)
    with pytest.raises(ValueError, match="out of range"):
        a.free(np.array(bad))
    assert a.num_free == 0


@pytest.mark.parametrize("bad", [np.array([1.0]), np.array([True]), np.zeros((1, 1), np.int64)])
def test_free_rejects_non_integer_or_non_1d(bad: np.ndarray) -> None:
    a = SlotAllocator(4)
    a.alloc(4)
    with pytest.raises(ValueError, match="1-D integer"):
        a.free(bad)
    assert a.num_free == 0


def test_free_slots_is_a_sorted_copy() -> None:
    a = SlotAllocator(5)
    s = a.alloc(5)
    a.free(s[[4, 0, 2]])
    out = a.free_slots()
    assert out.tolist() == [0, 2, 4]
    out[:] = 1
    assert a.free_slots().tolist() == [0, 2, 4]


# ------------------------------------------------------------------------------- KVPool


LAYOUT = [(2, 16), (4, 16), (1, 8)]  # kv heads and head dim differ per layer (pruned model)


def test_pool_shapes_per_layer() -> None:
    pool = KVPool(LAYOUT, 10, dtype=torch.float16)
    assert len(pool.k) == len(pool.v) == 3
    for (heads, dim), k, v in zip(LAYOUT, pool.k, pool.v):
        assert k.shape == v.shape == (10, heads, dim)
        assert k.dtype == v.dtype == torch.float16
        assert k.device == pool.device == torch.device("cpu")
    assert pool.kv_layout == LAYOUT
    assert pool.allocator.num_slots == pool.num_slots == 10
    assert pool.nbytes == 10 * bytes_per_slot(LAYOUT, 2)


def test_pool_rejects_empty_layout_and_bad_count() -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        KVPool([], 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="num_slots"):
        KVPool(LAYOUT, 0, dtype=torch.float32)
    with pytest.raises(ValueError, match="num_slots"):
        KVPool(LAYOUT, -3, dtype=torch.float32)


def test_bytes_per_slot_counts_k_and_v_of_every_layer() -> None:
    assert bytes_per_slot(LAYOUT, 2) == 2 * (2 * 16 + 4 * 16 + 1 * 8) * 2


def test_slots_for_budget_from_tokens() -> None:
    assert KVPool.slots_for_budget(LAYOUT, torch.bfloat16, max_tokens=123) == 123
    with pytest.raises(ValueError, match=">= 1"):
        KVPool.slots_for_budget(LAYOUT, torch.bfloat16, max_tokens=0)


def test_slots_for_budget_from_bytes() -> None:
    per = bytes_per_slot(LAYOUT, 2)
    got = KVPool.slots_for_budget(LAYOUT, torch.bfloat16, memory_bytes=per * 50 + per - 1)
    assert got == 50
    per32 = bytes_per_slot(LAYOUT, 4)
    assert KVPool.slots_for_budget(LAYOUT, torch.float32, memory_bytes=per32 * 7) == 7
    with pytest.raises(ValueError, match=f"holds no token \\({per} bytes per token\\)"):
        KVPool.slots_for_budget(LAYOUT, torch.bfloat16, memory_bytes=per - 1)


def test_slots_for_budget_needs_exactly_one_budget() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        KVPool.slots_for_budget(LAYOUT, torch.float16)
    with pytest.raises(ValueError, match="exactly one"):
        KVPool.slots_for_budget(LAYOUT, torch.float16, max_tokens=1, memory_bytes=10**6)


def test_slots_for_budget_rejects_layout_without_bytes() -> None:
    with pytest.raises(ValueError, match="no bytes per token"):
        KVPool.slots_for_budget([], torch.float16, memory_bytes=10**6)
    with pytest.raises(ValueError, match="no bytes per token"):
        KVPool.slots_for_budget([(0, 64)], torch.float16, memory_bytes=10**6)
