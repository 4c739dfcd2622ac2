"""The Triton attention path over KV-pool slots: per-step plan, KV store and attention.

:func:`plan_triton` splits a batch into decode sequences (one new token: the split-K decode
kernel) and extend sequences (several new tokens: the extend kernel). Both kernels read context
lengths and slots on the device, so the grids depend only on the number of sequences,
``max(new_lens)`` and the split count, never on context lengths: a decode step is replayable in
a CUDA graph. There ``ctx_lens`` are upper bounds (they only choose the split count) and a row
whose slot is ``-1`` writes no K/V.

:mod:`slmserve.models.attention` dispatches here when the decoder's backend is ``"triton"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmserve.interfaces import ForwardBatch
from slmserve.kernels.decode import decode_attention, num_kv_splits
from slmserve.kernels.extend import extend_attention
from slmserve.kernels.kv_store import store_kv


@dataclass(slots=True)
class TritonPlan:
    """Per-step indices shared by all layers."""

    batch: ForwardBatch
    decode_seqs: torch.Tensor | None  # [Bd] batch indices of the one-token sequences
    decode_rows: torch.Tensor | None  # [Bd] their flat query rows
    extend_seqs: torch.Tensor | None  # [Be] batch indices of the others
    max_new: int
    num_splits: int

    def write_kv(
        self, k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        store_kv(k, v, k_pool, v_pool, self.batch.out_slots)

    def attend(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float
    ) -> torch.Tensor:
        batch = self.batch
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty_like(q)
        if self.decode_seqs is not None:
            decode_attention(
                q,
                k_pool,
                v_pool,
                out,
                seqs=self.decode_seqs,
                rows=self.decode_rows,
                cu_ctx=batch.cu_ctx,
                context_slots=batch.context_slots,
                scale=scale,
                num_splits=self.num_splits,
            )
        if self.extend_seqs is not None:
            extend_attention(
                q,
                k_pool,
                v_pool,
                out,
                seqs=self.extend_seqs,
                max_new=self.max_new,
                cu_new=batch.cu_new,
                cu_ctx=batch.cu_ctx,
                context_slots=batch.context_slots,
                scale=scale,
            )
        return out


def plan_triton(batch: ForwardBatch) -> TritonPlan:
    """Which sequences go to which kernel (device index tensors; no host<->device sync)."""
    new_lens, ctx_lens = batch.new_lens, batch.ctx_lens
    num_seqs = len(new_lens)
    n_dec = sum(1 for n in new_lens if n == 1)
    if n_dec in (0, num_seqs):
        seqs = torch.arange(num_seqs, device=batch.cu_new.device)
        decode, extend = (seqs, None) if n_dec else (None, seqs)
    else:
        # Stable sort: decode sequences first, each group in batch order.
        counts = batch.cu_new[1:] - batch.cu_new[:-1]
        order = torch.argsort((counts != 1).to(torch.int8), stable=True)
        decode, extend = order[:n_dec], order[n_dec:]
    splits = 1
    if decode is not None:
        splits = num_kv_splits(n_dec, max(c for n, c in zip(new_lens, ctx_lens) if n == 1))
    return TritonPlan(
        batch,
        decode_seqs=decode,
        decode_rows=None if decode is None else batch.cu_new[decode],
        extend_seqs=extend,
        max_new=max(new_lens) if extend is not None else 0,
        num_splits=splits,
    )
