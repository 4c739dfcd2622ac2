"""Extend (prefill) attention over KV-pool slots for a ragged batch, causal, with GQA.

Sequence ``i`` has ``n`` new query rows and a context of ``c`` slots (its cached prefix followed
by the new tokens, whose keys and values are already in the pool); new row ``j`` sees context
entries ``0 .. c - n + j``. One program handles ``BLOCK_M`` query rows of one sequence and one
query head, streaming the visible keys in ``BLOCK_N`` blocks gathered by slot, with the online
softmax in float32 (FlashAttention-2's loop; SGLang's extend kernel reads its prefix the same
way, through a slot table).

Keys before the block's first row's causal limit need no mask, so the loop runs in two parts:
the unmasked bulk, then the few blocks on the diagonal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slmserve.kernels.online_softmax import LOG2E, attend_block, dot_in_f32

BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _extend_kernel(
    Q,
    KPool,
    VPool,
    Out,
    Slots,
    CuNew,
    CuCtx,
    Seqs,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    Q_F32: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
):
    i = tl.program_id(0)
    hp = tl.program_id(1)
    mb = tl.program_id(2)
    seq = tl.load(Seqs + i)
    q_start = tl.load(CuNew + seq)
    n_new = tl.load(CuNew + seq + 1) - q_start
    if mb * BLOCK_M < n_new:
        c_start = tl.load(CuCtx + seq)
        prefix = tl.load(CuCtx + seq + 1) - c_start - n_new
        kvh = hp * HEADS_PER_PROGRAM // GROUP
        # The program's rows: BLOCK_M new tokens for each of its HEADS_PER_PROGRAM query heads
        # (stacked head by head), which all read the same KV head.
        r = tl.arange(0, HEADS_PER_PROGRAM * BLOCK_M)
        heads = hp * HEADS_PER_PROGRAM + r // BLOCK_M
        rows = mb * BLOCK_M + r % BLOCK_M
        r_mask = rows < n_new
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        q = tl.load(
            Q + (q_start + rows)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if Q_F32:
            q = q.to(tl.float32)
        q_pos = prefix + rows  # the last context entry each row may see
        m = tl.full([HEADS_PER_PROGRAM * BLOCK_M], float("-inf"), tl.float32)
        l_sum = tl.zeros([HEADS_PER_PROGRAM * BLOCK_M], tl.float32)
        acc = tl.zeros([HEADS_PER_PROGRAM * BLOCK_M, BLOCK_D], tl.float32)
        # Keys every row of the block sees (before its first row's diagonal): no causal mask.
        bulk = (prefix + mb * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        end = prefix + tl.minimum((mb + 1) * BLOCK_M, n_new)
        for n0 in range(0, bulk, BLOCK_N):
            m, l_sum, acc = attend_block(
                q, m, l_sum, acc, KPool, VPool, Slots + c_start, n0, end, q_pos, kvh, d,
                d_mask, stride_kt, stride_kh, stride_vt, stride_vh, scale_log2,
                False, BLOCK_N, IEEE,
            )  # fmt: skip
        for n0 in range(bulk, end, BLOCK_N):
            m, l_sum, acc = attend_block(
                q, m, l_sum, acc, KPool, VPool, Slots + c_start, n0, end, q_pos, kvh, d,
                d_mask, stride_kt, stride_kh, stride_vt, stride_vh, scale_log2,
                True, BLOCK_N, IEEE,
            )  # fmt: skip
        out = acc / l_sum[:, None]
        tl.store(
            Out + (q_start + rows)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=r_mask[:, None] & d_mask[None, :],
        )


def extend_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    out: torch.Tensor,
    *,
    seqs: torch.Tensor,
    max_new: int,
    cu_new: torch.Tensor,
    cu_ctx: torch.Tensor,
    context_slots: torch.Tensor,
    scale: float,
    tile: tuple[int, int, int] | None = None,
    pack_gqa: bool = False,
) -> None:
    """Causal attention of the new rows of sequences ``seqs``, written into ``out`` in place.

    :param q: ``[T, heads, head_dim]`` flat new-token queries (rope applied).
    :param seqs: ``[Be]`` batch indices (into ``cu_new``/``cu_ctx``) of the sequences to run.
    :param max_new: the most new tokens any of them has (host int: sizes the grid).
    :param context_slots: flat pool slots of every context, split by ``cu_ctx``.
    :param tile: ``(block_m, block_n, num_warps)`` instead of the defaults (``BLOCK_M``,
        ``BLOCK_N``, Triton's 4 warps); ``benchmarks/gpu_kernels.py`` compares them.
    :param pack_gqa: one program per KV head instead of per query head, its rows the
        ``block_m`` new tokens of each query head of the group, so every key and value block
        is read once per group rather than once per query head (the group size must be a
        power of two).
    """
    num_seqs = seqs.shape[0]
    if num_seqs == 0 or max_new == 0:
        return
    block_m, block_n, num_warps = tile or (BLOCK_M, BLOCK_N, 4)
    heads, head_dim = q.shape[1], q.shape[2]
    group = heads // k_pool.shape[1]
    per_program = group if pack_gqa else 1
    if per_program & (per_program - 1):
        raise ValueError(f"pack_gqa needs a power-of-two GQA group, not {group}")
    grid = (num_seqs, heads // per_program, triton.cdiv(max_new, block_m))
    _extend_kernel[grid](
        q,
        k_pool,
        v_pool,
        out,
        context_slots,
        cu_new,
        cu_ctx,
        seqs,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        v_pool.stride(0),
        v_pool.stride(1),
        out.stride(0),
        out.stride(1),
        scale * LOG2E,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        IEEE=q.dtype == torch.float32,
        Q_F32=dot_in_f32(q.dtype),
        HEADS_PER_PROGRAM=per_program,
        num_warps=num_warps,
    )
