"""The online-softmax step shared by the extend and decode kernels (FlashAttention-2 style).

Scores, running max and sums stay in float32 whatever the input dtype; keys and values are
gathered row by row from the pool through their slot ids and cast to the query's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slmserve.kernels import interpreter_enabled

LOG2E = 1.4426950408889634


def dot_in_f32(dtype: torch.dtype) -> bool:
    """Run the ``tl.dot`` products in float32 (``Q_F32``): only for bf16 in the interpreter,
    whose ``tl.dot`` multiplies bf16 operands as raw integers (triton 3.9). Keys and values
    follow the query's dtype inside the block, so casting the query is enough."""
    return dtype == torch.bfloat16 and interpreter_enabled()


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
