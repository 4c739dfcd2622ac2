"""Write the new tokens' keys and values into the KV pool, skipping rows whose slot is < 0.

``index_copy_`` cannot skip rows, and a CUDA-graph decode step padded to a captured batch size
has rows that must write nowhere: they carry slot ``-1``. One launch stores K and V together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    K,
    V,
    KPool,
    VPool,
    Slots,
    stride_k,
    stride_v,
    stride_kp,
    stride_vp,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(Slots + t)
    if slot >= 0:
        cols = tl.arange(0, BLOCK)
        mask = cols < ROW
        k = tl.load(K + t * stride_k + cols, mask=mask)
        v = tl.load(V + t * stride_v + cols, mask=mask)
        tl.store(KPool + slot * stride_kp + cols, k, mask=mask)
        tl.store(VPool + slot * stride_vp + cols, v, mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """``k_pool[slots[t]] = k[t]`` (same for v) for every ``t`` with ``slots[t] >= 0``.

    :param k: ``[T, kv_heads, head_dim]``; cast to the pool dtype first (by torch, which rounds
        to nearest; the kernel only copies).
    :param slots: ``[T]`` int64 pool slots (``-1``: do not write).
    """
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    k = k.to(k_pool.dtype).reshape(num_tokens, row)
    v = v.to(v_pool.dtype).reshape(num_tokens, row)
    if k.stride(1) != 1 or v.stride(1) != 1:
        k, v = k.contiguous(), v.contiguous()
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_pool,
        v_pool,
        slots,
        k.stride(0),
        v.stride(0),
        k_pool.stride(0),
        v_pool.stride(0),
        ROW=row,
        BLOCK=triton.next_power_of_2(row),
    )
