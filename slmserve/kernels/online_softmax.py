"""The online-softmax step shared by the extend and decode kernels (FlashAttention-2 style).

Scores, running max and sums stay in float32 whatever the input dtype; keys and values are
gathered row by row from the pool through their slot ids.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def attend_block(
    q,
    m,
    l_sum,
    acc,
    KPool,
    VPool,
    Slots,
    n0,
    end,
    q_pos,
    kvh,
    d,
    d_mask,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    scale_log2,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Fold keys/values ``n0 .. n0 + BLOCK_N`` (those ``< end``; gathered through ``Slots``)
    into the running max ``m``, sum ``l_sum`` and output ``acc`` of the query rows ``q``.

    ``s`` is pre-scaled by ``log2(e)`` so ``exp2`` replaces ``exp``. With ``CAUSAL`` row ``r``
    sees only columns ``<= q_pos[r]``. The first block a row sees must hold one visible
    column for that row (so its max is finite); later blocks may hide everything.
    """
    cols = n0 + tl.arange(0, BLOCK_N)
    c_mask = cols < end
    slot = tl.load(Slots + cols, mask=c_mask, other=0)
    kv_mask = c_mask[:, None] & d_mask[None, :]
    k = tl.load(
        KPool + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0
    ).to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    visible = c_mask[None, :]
    if CAUSAL:
        visible = visible & (cols[None, :] <= q_pos[:, None])
    s = tl.where(visible, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    v = tl.load(
        VPool + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0
    ).to(q.dtype)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_sum, acc
