"""Turn a step plan into one ragged ``ForwardBatch`` (flat ids, positions, slots).

Everything the device needs for a step (the batch itself and the runner's few index arrays:
logit rows, label rows) is built on the host with numpy and crosses to the device in ONE copy:
:class:`HostStager` packs the int64 arrays into one reused pinned buffer, issues one
non-blocking transfer and hands back device views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slmserve.engine.core import StepPlan
from slmserve.interfaces import ForwardBatch

_BATCH_FIELDS = (
    "input_ids",
    "positions",
    "out_slots",
    "cu_new",
    "context_slots",
    "cu_ctx",
    "logit_indices",
)


@dataclass(slots=True)
class HostBatch:
    """A step flattened on the host; ``arrays`` follow ``_BATCH_FIELDS``."""

    arrays: list[np.ndarray]
    new_lens: list[int]
    ctx_lens: list[int]
    ranges: list[tuple[int, int]]
    """Per plan item, ``(first_row, num_rows)`` into the logit rows; a sampling item's row is
    its last one."""

    def to_device(
        self, stager: HostStager, extras: Sequence[np.ndarray] = ()
    ) -> tuple[ForwardBatch, list[torch.Tensor]]:
        """The device batch plus device copies of ``extras`` (int64), all in one transfer."""
        tensors = stager.to_device([*self.arrays, *extras])
        n = len(_BATCH_FIELDS)
        fields = dict(zip(_BATCH_FIELDS, tensors[:n]))
        batch = ForwardBatch(**fields, new_lens=self.new_lens, ctx_lens=self.ctx_lens)
        return batch, tensors[n:]


def flatten(plan: StepPlan) -> HostBatch:
    """Flatten the plan with numpy.

    Logits are requested at the last token of every chunk that completes its sequence, and at
    every prompt position of requests that asked for prompt log-probabilities.
    """
    items = plan.items
    n_items = len(items)
    new_lens = [it.n for it in items]
    ctx_lens = [len(it.context) for it in items]
    cu_new = np.zeros(n_items + 1, np.int64)
    np.cumsum(new_lens, out=cu_new[1:])
    cu_ctx = np.zeros(n_items + 1, np.int64)
    np.cumsum(ctx_lens, out=cu_ctx[1:])
    total = int(cu_new[-1])

    ids: list[int] = []
    for it in items:
        if it.future:
            ids.append(0)  # sampled by a step still in flight: the runner fills it in
        else:
            ids.extend(it.seq.tokens[it.start : it.start + it.n])
    starts = np.fromiter((it.start for it in items), np.int64, n_items)
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu_new[:-1] - starts, new_lens)
    out_slots = np.concatenate([it.new_slots for it in items])
    context = np.concatenate([it.context for it in items])

    # Logit rows, without a numpy call per item: every token of a prompt-logprob chunk, the
    # last token of a chunk that samples.
    wants_all = np.fromiter(
        (it.seq.prompt_logprobs is not None and it.start < it.seq.num_prompt for it in items),
        bool,
        n_items,
    )
    samples = np.fromiter((it.sample for it in items), bool, n_items)
    is_row = np.repeat(wants_all, new_lens)
    is_row[cu_new[1:][samples] - 1] = True
    logit_indices = np.flatnonzero(is_row).astype(np.int64, copy=False)
    counts = np.where(wants_all, cu_new[1:] - cu_new[:-1], samples)
    firsts = np.cumsum(counts) - counts
    ranges = list(zip(firsts.tolist(), counts.tolist()))
    arrays = [np.asarray(ids, np.int64), positions, out_slots, cu_new, context, cu_ctx]
    arrays.append(logit_indices)
    return HostBatch(arrays, new_lens, ctx_lens, ranges)


STAGING_BUFFERS = 4
"""Pinned buffers in a :class:`HostStager` ring: more than the steps the engine keeps in flight
(``slmserve.engine.engine.MAX_STEPS_IN_FLIGHT``), so the buffer being refilled always belongs
to a step already collected."""


class HostStager:
    """Moves a list of int64 arrays to the device with one copy.

    On CUDA the arrays are packed into a pinned buffer and copied asynchronously
    (``non_blocking``), with no allocation once the buffers are large enough. The buffers form a
    ring, one per step that can be in flight (overlapped steps) plus one: a buffer is refilled
    only after the copy that last read it is done (an event recorded after that copy), and with
    the ring that copy is ``depth`` steps old, so refilling never waits on a copy still queued
    behind device work. On the CPU the packed array is used in place.
    """

    def __init__(self, device: torch.device | str, depth: int = STAGING_BUFFERS) -> None:
        self.device = torch.device(device)
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event] | None] = [None] * depth
        self._next = 0

    def to_device(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        sizes = [len(a) for a in arrays]
        total = sum(sizes)
        if self.device.type != "cuda":
            flat = torch.from_numpy(np.concatenate(arrays).astype(np.int64, copy=False))
            return list(flat.to(self.device).split(sizes))
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        entry = self._buffers[slot]
        if entry is None or entry[0].numel() < total:
            # A replaced buffer may still feed a copy: the caching host allocator keeps it
            # alive until that copy is done.
            size = max(total, 2 * (0 if entry is None else entry[0].numel()), 4096)
            entry = (torch.empty(size, dtype=torch.int64, pin_memory=True), torch.cuda.Event())
            self._buffers[slot] = entry
        else:
            entry[1].synchronize()  # the copy that last read this buffer, steps ago: done
        pinned, copied = entry
        host = pinned[:total]
        np.concatenate(arrays, out=host.numpy(), casting="same_kind")
        flat = host.to(self.device, non_blocking=True)
        copied.record()
        return list(flat.split(sizes))
