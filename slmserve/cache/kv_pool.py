"""KV tensors per layer and the allocator that hands out token slots.

A slot is one token's K and V in every layer (page size 1, as in SGLang). Slot ids travel as
int64 numpy arrays on the host: slicing and concatenating them costs far less than small torch
tensors, and a whole batch's slots become one tensor once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class KVCacheExhausted(RuntimeError):
    """Not enough free slots: the caller must evict, preempt or wait (never overwrite)."""


class SlotAllocator:
    """Free list of slot ids kept as a stack in one numpy array.

    ``alloc(n)`` and ``free(slots)`` are one vectorised copy each (O(1) Python work per call).
    A boolean mask of free slots turns a double free or a foreign slot into an error instead of
    silent corruption.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        # Reversed so the first allocations get low, contiguous slot ids.
        self._stack = np.arange(num_slots - 1, -1, -1, dtype=np.int64)
        self._top = num_slots
        self._is_free = np.ones(num_slots, dtype=bool)
        # Scratch for the O(n) duplicate check in free(); np.unique is O(n log n) and costs
        # ~18 µs for 300 slots (~0.5 ms for 5,000) with numpy 2.x, on every eviction.
        self._mark = np.zeros(num_slots, dtype=np.int64)

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_slots - self._top

    def alloc(self, n: int) -> np.ndarray:
        """Return ``n`` distinct free slots, or raise :class:`KVCacheExhausted`."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self._top:
            raise KVCacheExhausted(
                f"KV cache exhausted: asked for {n} slots, {self._top} of {self.num_slots} free"
            )
        self._top -= n
        out = self._stack[self._top : self._top + n][::-1].copy()
        self._is_free[out] = False
        return out

    def free(self, slots: np.ndarray) -> None:
        """Give slots back. Freeing a free slot, a slot twice or an out-of-range id raises
        ``ValueError`` (and frees nothing)."""
        slots = np.asarray(slots)
        if slots.size == 0:
            return
        if slots.ndim != 1 or slots.dtype.kind not in "iu":
            raise ValueError(
                f"slots must be a 1-D integer array, got dtype {slots.dtype} shape {slots.shape}"
            )
        slots = slots.astype(np.int64, copy=False)
        n = len(slots)
        if slots.min() < 0 or slots.max() >= self.num_slots:
            raise ValueError(f"slot ids out of range [0, {self.num_slots}): {slots}")
        already = self._is_free[slots]
        if already.any():
            raise ValueError(f"double free of KV slots {slots[already]}")
        if n > 1:
            # Scatter each position's index to its slot and read it back: a slot listed twice
            # keeps only one of its positions, so some position reads back another's index.
            ids = np.arange(n)
            self._mark[slots] = ids
            if (self._mark[slots] != ids).any():
                uniq, counts = np.unique(slots, return_counts=True)
                raise ValueError(f"KV slots listed twice in one free: {uniq[counts > 1]}")
        self._is_free[slots] = True
        self._stack[self._top : self._top + n] = slots
        self._top += n

    def free_slots(self) -> np.ndarray:
        """The currently free slot ids (a copy; for integrity checks and tests)."""
        return np.sort(self._stack[: self._top])


def bytes_per_slot(kv_layout: Sequence[tuple[int, int]], element_size: int) -> int:
    """Bytes one token occupies across all layers (K and V)."""
    return sum(2 * heads * dim * element_size for heads, dim in kv_layout)


class KVPool:
    """Per-layer K and V tensors ``[num_slots, kv_heads, head_dim]`` plus their allocator.

    Layers may have different KV head counts or head dims (pruned models); a slot id means the
    same token in every layer.
    """

    def __init__(
        self,
        kv_layout: Sequence[tuple[int, int]],
        num_slots: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        import torch

        if not kv_layout:
            raise ValueError("kv_layout must list at least one layer")
        self.kv_layout = [(int(h), int(d)) for h, d in kv_layout]
        # Before the tensors: a bad count must be this ValueError, not a torch error.
        self.allocator = SlotAllocator(num_slots)
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = torch.device(device)
        self.k = [torch.zeros(num_slots, h, d, dtype=dtype, device=device) for h, d in kv_layout]
        self.v = [torch.zeros(num_slots, h, d, dtype=dtype, device=device) for h, d in kv_layout]

    @staticmethod
    def slots_for_budget(
        kv_layout: Sequence[tuple[int, int]],
        dtype: torch.dtype,
        *,
        max_tokens: int | None = None,
        memory_bytes: int | None = None,
    ) -> int:
        """Number of slots from a token budget, or from a byte budget (whichever is given)."""
        if (max_tokens is None) == (memory_bytes is None):
            raise ValueError("give exactly one of max_tokens or memory_bytes")
        if max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"KV token budget must be >= 1, got {max_tokens}")
            return max_tokens
        import torch

        per_slot = bytes_per_slot(kv_layout, torch.empty((), dtype=dtype).element_size())
        if per_slot <= 0:
            raise ValueError(f"kv_layout {list(kv_layout)} stores no bytes per token")
        n = int(memory_bytes or 0) // per_slot
        if n < 1:
            raise ValueError(
                f"KV memory budget of {memory_bytes} bytes holds no token "
                f"({per_slot} bytes per token)"
            )
        return n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
