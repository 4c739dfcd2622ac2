"""Attention over KV-pool slots: the torch reference path.

:func:`plan_attention` turns a :class:`~slmserve.interfaces.ForwardBatch` into index tensors
once per step; :func:`attend` then runs every layer with them. A Triton kernel can replace
``attend`` with the same signature (it may read ``plan.batch`` and ignore the padded indices).

* Decode sequences (exactly one new token) run as ONE batched SDPA call: their contexts are
  gathered from the pool, padded to the longest, and masked. GQA is handled without copying K/V
  by folding the query heads of a group into SDPA's query-length axis.
* Sequences with several new tokens (prefill or extend chunks, few per step) run one SDPA call
  each, with a mask that lets new token ``j`` see context entries ``[0, ctx - new + j]``.

Every index is built on the device from ``batch`` tensors; host-side ``new_lens``/``ctx_lens``
only size the buffers, so a step needs no host<->device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F

from slmserve.interfaces import ForwardBatch


@dataclass(slots=True)
class PrefillPart:
    """One sequence with several new tokens: its query rows, context slots and mask."""

    start: int  # first flat new-token row
    end: int
    slots: torch.Tensor  # [ctx] pool slots of the whole context
    mask: torch.Tensor | None  # [new, ctx] bool; None means plain causal (no cached prefix)


@dataclass(slots=True)
class AttentionPlan:
    """Per-step indices shared by all layers (built once by :func:`plan_attention`)."""

    batch: ForwardBatch
    decode_rows: torch.Tensor | None = None  # [Bd] flat rows of the decode tokens
    decode_slots: torch.Tensor | None = None  # [Bd, max_ctx] pool slots (padding -> a valid slot)
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, max_ctx] bool, True = attend
    prefills: list[PrefillPart] = field(default_factory=list)


def plan_attention(batch: ForwardBatch) -> AttentionPlan:
    """Build the gather indices and masks for one step (no host<->device sync)."""
    plan = AttentionPlan(batch)
    new_lens, ctx_lens = batch.new_lens, batch.ctx_lens
    cu_new = [0, *accumulate(new_lens)]
    cu_ctx = [0, *accumulate(ctx_lens)]
    device = batch.input_ids.device
    decode = [i for i, n in enumerate(new_lens) if n == 1]
    if decode:
        n_dec = len(decode)
        if n_dec == len(new_lens):
            seq = torch.arange(n_dec, device=device)
        else:
            # Stable sort puts the decode sequences first, in batch order; the count is known
            # on the host, so no nonzero() (which would sync) is needed.
            counts = batch.cu_new[1:] - batch.cu_new[:-1]
            seq = torch.argsort((counts != 1).to(torch.int8), stable=True)[:n_dec]
        max_ctx = max(ctx_lens[i] for i in decode)
        starts = batch.cu_ctx[seq]
        lens = batch.cu_ctx[seq + 1] - starts
        offs = torch.arange(max_ctx, device=device)
        valid = offs[None, :] < lens[:, None]
        flat = torch.where(valid, starts[:, None] + offs[None, :], starts[:, None])
        plan.decode_rows = batch.cu_new[seq]
        plan.decode_slots = batch.context_slots[flat]
        plan.decode_mask = valid[:, None, None, :]
    for i, n in enumerate(new_lens):
        if n < 2:
            continue
        ctx = ctx_lens[i]
        if ctx < n:
            raise ValueError(f"sequence {i}: context ({ctx}) shorter than its new tokens ({n})")
        mask = None
        if ctx != n:
            q_pos = torch.arange(ctx - n, ctx, device=device)
            mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]
        slots = batch.context_slots[cu_ctx[i] : cu_ctx[i + 1]]
        plan.prefills.append(PrefillPart(cu_new[i], cu_new[i + 1], slots, mask))
    return plan


def attend(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:
    """Attention of the new tokens over their contexts in the pool.

    :param q: ``[T, heads, head_dim]`` queries (rope applied), flat over the batch.
    :param k_pool: ``[num_slots, kv_heads, head_dim]``; already holds this step's new keys.
    :param v_pool: same for values.
    :returns: ``[T, heads, head_dim]``.
    """
    heads, head_dim = q.shape[1:]
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    if plan.decode_rows is not None:
        rows = plan.decode_rows
        # [Bd, kv_heads, group, D]: the group's query heads act as SDPA's query axis.
        qd = q[rows].view(-1, kv_heads, group, head_dim)
        k = _gather(k_pool, plan.decode_slots).to(q.dtype).transpose(1, 2)  # [Bd, kv, ctx, D]
        v = _gather(v_pool, plan.decode_slots).to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=plan.decode_mask, scale=scale)
        out[rows] = o.reshape(-1, heads, head_dim)
    for part in plan.prefills:
        qp = q[part.start : part.end].transpose(0, 1)  # [heads, new, D]
        k = _expand_kv(_gather(k_pool, part.slots).to(q.dtype), group)  # [heads, ctx, D]
        v = _expand_kv(_gather(v_pool, part.slots).to(q.dtype), group)
        o = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=part.mask, is_causal=part.mask is None, scale=scale
        )
        out[part.start : part.end] = o.transpose(0, 1)
    return out


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``pool[slots]`` via ``index_select`` on the flat index: about 2x faster on CPU."""
    return pool.index_select(0, slots.reshape(-1)).view(*slots.shape, *pool.shape[1:])


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[ctx, kv_heads, D]`` -> ``[heads, ctx, D]``; query head h reads kv head h // group."""
    x = x.transpose(0, 1)
    if group == 1:
        return x
    kv_heads, ctx, dim = x.shape
    return x[:, None].expand(kv_heads, group, ctx, dim).reshape(kv_heads * group, ctx, dim)
