"""Decode attention over KV-pool slots: one query token per sequence, GQA, split-K.

Flash-decoding: a sequence's context is cut into ``num_splits`` equal ranges and each range is
reduced by its own program, so a small batch still fills the GPU; a second kernel merges the
partial results through their log-sum-exp. One program serves all query heads of a KV group,
so each key and value row is read once per group, not once per query head.

The grid depends only on the batch size, the KV head count and ``num_splits``; every context
length is read on the device. That makes a decode step capturable in a CUDA graph and replayable
with other lengths, and a sequence with an empty context (a padding row) yields zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slmserve.kernels.online_softmax import LOG2E, attend_block, dot_in_f32

BLOCK_N = 64
MAX_SPLITS = 16


@triton.jit
def _decode_partial_kernel(
    Q,
    KPool,
    VPool,
    Slots,
    CuCtx,
    Seqs,
    Rows,
    MidO,
    MidLse,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    scale_log2,
    HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    Q_F32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(Seqs + b)
    row = tl.load(Rows + b)
    start = tl.load(CuCtx + seq)
    ctx = tl.load(CuCtx + seq + 1) - start
    per_split = tl.cdiv(ctx, NUM_SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    h_off = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + h_off
    h_mask = h_off < GROUP
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(
        Q + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if Q_F32:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        # Not causal: every key of the split is visible (q_pos, the 10th argument, is unused).
        m, l_sum, acc = attend_block(
            q, m, l_sum, acc, KPool, VPool, Slots + start, n0, hi, hi, kvh, d, d_mask,
            stride_kt, stride_kh, stride_vt, stride_vh, scale_log2, False, BLOCK_N, IEEE,
        )  # fmt: skip
    empty = l_sum == 0.0
    out = acc / tl.where(empty, 1.0, l_sum)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l_sum)))
    mid = (b * HEADS + heads) * NUM_SPLITS + split
    tl.store(
        MidO + mid[:, None] * HEAD_DIM + d[None, :], out, mask=h_mask[:, None] & d_mask[None, :]
    )
    tl.store(MidLse + mid, lse, mask=h_mask)


@triton.jit
def _decode_merge_kernel(
    MidO,
    MidLse,
    Out,
    Rows,
    stride_ot,
    stride_oh,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(Rows + b)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    base = (b * HEADS + h) * NUM_SPLITS
    lse = tl.load(MidLse + base + s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(MidO + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=d_mask[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + row * stride_ot + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_mask)


def num_kv_splits(batch_size: int, max_ctx: int) -> int:
    """Splits per sequence: ~64 (sequence, split) pairs, so ~512 programs with 8 KV heads, and
    no split shorter than 256 keys; a power of 2 (the merge kernel's ``arange``)."""
    want = max(1, min(64 // max(1, batch_size), math.ceil(max_ctx / 256)))
    return min(MAX_SPLITS, triton.next_power_of_2(want))


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    out: torch.Tensor,
    *,
    seqs: torch.Tensor,
    rows: torch.Tensor,
    cu_ctx: torch.Tensor,
    context_slots: torch.Tensor,
    scale: float,
    num_splits: int,
) -> None:
    """Attention of one query row per decode sequence, written into ``out`` in place.

    :param q: ``[T, heads, head_dim]``; row ``rows[b]`` is decode sequence ``b``'s query.
    :param k_pool: ``[num_slots, kv_heads, head_dim]`` (already holds this step's keys).
    :param out: ``[T, heads, head_dim]``; only rows ``rows`` are written.
    :param seqs: ``[Bd]`` batch index of each decode sequence (into ``cu_ctx``).
    :param cu_ctx: ``[B+1]`` offsets of each sequence's context in ``context_slots``.
    :param num_splits: power of 2, at most :data:`MAX_SPLITS`.
    """
    num_seqs = seqs.shape[0]
    if num_seqs == 0:
        return
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    block_d = triton.next_power_of_2(head_dim)
    mid_o = torch.empty(num_seqs, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(num_seqs, heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_partial_kernel[(num_seqs, kv_heads, num_splits)](
        q,
        k_pool,
        v_pool,
        context_slots,
        cu_ctx,
        seqs,
        rows,
        mid_o,
        mid_lse,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        v_pool.stride(0),
        v_pool.stride(1),
        scale * LOG2E,
        HEADS=heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=BLOCK_N,
        IEEE=q.dtype == torch.float32,
        Q_F32=dot_in_f32(q.dtype),
    )
    _decode_merge_kernel[(num_seqs, heads)](
        mid_o,
        mid_lse,
        out,
        rows,
        out.stride(0),
        out.stride(1),
        HEADS=heads,
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        BLOCK_D=block_d,
    )
