"""Turn a step plan into one ragged ``ForwardBatch`` (flat ids, positions, slots)."""

from __future__ import annotations

import numpy as np
import torch

from slmserve.engine.core import StepPlan
from slmserve.interfaces import ForwardBatch


def build_batch(plan: StepPlan, device: torch.device) -> tuple[ForwardBatch, list[tuple[int, int]]]:
    """Flatten the plan with numpy, then move everything to the device in one go.

    Logits are requested at the last token of every chunk that completes its sequence, and at
    every prompt position of requests that asked for prompt log-probabilities. Also returns,
    per plan item, ``(first_row, num_rows)`` into the logit rows; a sampling item's row is its
    last one.
    """
    items = plan.items
    new_lens = [it.n for it in items]
    ctx_lens = [len(it.context) for it in items]
    cu_new = np.zeros(len(items) + 1, np.int64)
    np.cumsum(new_lens, out=cu_new[1:])
    cu_ctx = np.zeros(len(items) + 1, np.int64)
    np.cumsum(ctx_lens, out=cu_ctx[1:])
    total = int(cu_new[-1])

    ids: list[int] = []
    for it in items:
        ids.extend(it.seq.tokens[it.start : it.start + it.n])
    starts = np.fromiter((it.start for it in items), np.int64, len(items))
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu_new[:-1] - starts, new_lens)
    out_slots = np.concatenate([it.new_slots for it in items])
    context = np.concatenate([it.context for it in items])

    logit_rows: list[np.ndarray] = []
    ranges: list[tuple[int, int]] = []
    num_rows = 0
    for i, it in enumerate(items):
        if it.seq.prompt_logprobs is not None and it.start < it.seq.num_prompt:
            # Logits at every prompt token of the chunk (they score the next prompt token).
            rows = np.arange(cu_new[i], cu_new[i + 1], dtype=np.int64)
        elif it.sample:
            rows = cu_new[i + 1 : i + 2] - 1
        else:
            rows = cu_new[:0]
        logit_rows.append(rows)
        ranges.append((num_rows, len(rows)))
        num_rows += len(rows)
    logit_indices = np.concatenate(logit_rows) if logit_rows else np.empty(0, np.int64)

    def dev(a: np.ndarray | list[int]) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64).to(device, non_blocking=True)

    batch = ForwardBatch(
        input_ids=dev(ids),
        positions=dev(positions),
        out_slots=dev(out_slots),
        cu_new=dev(cu_new),
        context_slots=dev(context),
        cu_ctx=dev(cu_ctx),
        logit_indices=dev(logit_indices),
        new_lens=new_lens,
        ctx_lens=ctx_lens,
    )
    return batch, ranges
