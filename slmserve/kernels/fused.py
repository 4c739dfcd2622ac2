"""Fused element-wise kernels of a decoder layer: residual add + RMSNorm, q/k RMSNorm + rotary
embedding, and SiLU-and-multiply.

In a scoring step of thousands of tokens these ops move more bytes than the matmuls around
them compute: the torch RMSNorm alone is seven passes over the hidden states (float32 copy,
square, mean, scale, cast, weight), and the rotary embedding five more over the queries and
keys. Each kernel here reads its inputs once and writes its outputs once.

Every kernel rounds where the torch reference (``slmserve.models.decoder``, itself following
transformers) rounds: arithmetic in float32, cast to the model dtype after each op that torch
runs in the model dtype. So bf16 results match the torch path to the last bit except where
``exp``/``rsqrt`` differ by an ulp before rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    X,
    Res,
    W,
    Out,
    ResOut,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(Res + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # torch adds in the model dtype
        tl.store(ResOut + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * y).to(Out.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (or ``x``), then ``weight * rmsnorm(h)``; returns ``(normed, h)``.

    :param x: ``[T, N]``; ``residual`` the same shape.
    """
    num_rows, n = x.shape
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        x, residual = x.contiguous(), None if residual is None else residual.contiguous()
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if num_rows == 0:
        return out, res_out
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(num_rows,)](
        x,
        res,
        weight,
        out,
        res_out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        res_out.stride(0),
        eps,
        N=n,
        BLOCK=triton.next_power_of_2(n),
        HAS_RES=residual is not None,
    )
    return out, res_out


@triton.jit
def _norm_rope_kernel(
    X,
    W,
    Cos,
    Sin,
    Out,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_c,
    eps,
    HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < HEADS) & (c < HALF)
    base = X + t * stride_xt + h * stride_xh
    x1 = tl.load(base + c, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + c, mask=mask, other=0.0)
    dtype = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        ss = tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)
        inv = (1.0 / tl.sqrt(ss / (2 * HALF) + eps))[:, None]
        w1 = tl.load(W + c, mask=c < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + c, mask=c < HALF, other=0.0).to(tl.float32)
        f1 = (w1 * (f1 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        f2 = (w2 * (f2 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    cmask = c < HALF
    cos1 = tl.load(Cos + t * stride_c + c, mask=cmask, other=0.0).to(tl.float32)
    cos2 = tl.load(Cos + t * stride_c + HALF + c, mask=cmask, other=0.0).to(tl.float32)
    sin1 = tl.load(Sin + t * stride_c + c, mask=cmask, other=0.0).to(tl.float32)
    sin2 = tl.load(Sin + t * stride_c + HALF + c, mask=cmask, other=0.0).to(tl.float32)
    # torch: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the model dtype.
    o1 = (f1 * cos1).to(dtype).to(tl.float32) + (-f2 * sin1).to(dtype).to(tl.float32)
    o2 = (f2 * cos2).to(dtype).to(tl.float32) + (f1 * sin2).to(dtype).to(tl.float32)
    out = Out + t * stride_ot + h * stride_oh
    tl.store(out + c, o1.to(dtype), mask=mask)
    tl.store(out + HALF + c, o2.to(dtype), mask=mask)


def norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """Rotary embedding of ``x [T, heads, head_dim]``, after a per-head RMSNorm with ``weight``
    when one is given (Qwen3's q/k norm). ``cos``/``sin`` are ``[T, head_dim]`` in ``x``'s dtype
    (:func:`slmserve.models.rope.cos_sin`); the half-split convention of Llama/Qwen."""
    num_tokens, heads, head_dim = x.shape
    out = torch.empty((num_tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    if x.stride(2) != 1:
        x = x.contiguous()
    half = head_dim // 2
    _norm_rope_kernel[(num_tokens,)](
        x,
        weight if weight is not None else x,
        cos,
        sin,
        out,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        cos.stride(0),
        eps,
        HEADS=heads,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        HAS_NORM=weight is not None,
    )
    return out


@triton.jit
def _silu_mul_kernel(
    Gate, Up, Out, stride_g, stride_u, stride_o, N: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(Gate + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(Up + row * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # torch rounds silu(g) first
    tl.store(Out + row * stride_o + cols, (act * u.to(tl.float32)).to(g.dtype), mask=mask)


SILU_BLOCK = 1024


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``[T, N]`` inputs."""
    num_rows, n = gate.shape
    if gate.stride(1) != 1 or up.stride(1) != 1:
        gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if num_rows == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(n))
    _silu_mul_kernel[(num_rows, triton.cdiv(n, block))](
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), N=n, BLOCK=block
    )
    return out
