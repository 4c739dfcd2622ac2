"""The fused element-wise kernels (residual add + RMSNorm, q/k norm + rotary, SiLU-and-mul)
against the torch ops they replace in the decoder, in float32 and bfloat16.

As in test_kernels_attention.py, without a GPU the kernels run in Triton's interpreter on CPU
tensors (``TRITON_INTERPRET`` set before the kernel module is imported).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from slmserve.kernels import triton_available
from slmserve.models import rope
from slmserve.models.decoder import RMSNorm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
# On a GPU every new shape is a Triton compile (~1 s): fewer examples there.
FUZZ = settings(
    max_examples=8 if CUDA else 20, deadline=None, derandomize=True, phases=[Phase.generate]
)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 (where indexing, halves and masks are checked): within a few ulps. bf16 on a GPU:
    torch's bits but for rare one-ulp differences (``exp``/``sqrt`` before rounding). The CPU
    interpreter truncates float32 -> bf16 casts instead of rounding them to nearest, and the
    kernels round after every op as torch does, so there bf16 is held to a few ulps only."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.bfloat16:
        if CUDA:
            differ = (got != want).float().mean().item()
            assert differ <= 0.01, f"{differ:.2%} of bf16 values differ from torch's"
            torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1.6e-2)
        else:
            torch.testing.assert_close(got.float(), want.float(), atol=6e-2, rtol=4e-2)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _norm(n: int, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(n, 1e-6)
    norm.weight.data = (1 + 0.3 * torch.randn(n, generator=gen)).to(DEVICE, dtype)
    return norm


@FUZZ
@given(
    rows=st.sampled_from([1, 3, 17]),
    n=st.sampled_from([8, 48, 64, 100]),
    dtype=DTYPES,
    residual=st.booleans(),
    seed=st.integers(0, 100),
)
def test_add_rms_norm_matches_torch(
    rows: int, n: int, dtype: torch.dtype, residual: bool, seed: int
) -> None:
    from slmserve.kernels.fused import add_rms_norm

    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, n, generator=gen)).to(DEVICE, dtype)
    h = torch.randn(rows, n, generator=gen).to(DEVICE, dtype)
    norm = _norm(n, dtype, gen)
    got, got_h = add_rms_norm(x, norm.weight, norm.eps, residual=h if residual else None)
    want_h = h + x if residual else x
    _close(got_h, want_h)  # the add (bit-exact on a GPU)
    _close(got, norm(want_h))


@FUZZ
@given(
    tokens=st.sampled_from([1, 5]),
    heads=st.sampled_from([1, 2, 3, 8]),
    head_dim=st.sampled_from([8, 32, 128]),
    dtype=DTYPES,
    qk_norm=st.booleans(),
    seed=st.integers(0, 100),
)
def test_norm_rope_matches_torch(
    tokens: int, heads: int, head_dim: int, dtype: torch.dtype, qk_norm: bool, seed: int
) -> None:
    from slmserve.kernels.fused import norm_rope

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, head_dim, generator=gen).to(DEVICE, dtype)
    positions = torch.randint(0, 4000, (tokens,), generator=gen).to(DEVICE)
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = rope.cos_sin(positions, inv_freq.to(DEVICE), 1.0, dtype)
    norm = _norm(head_dim, dtype, gen) if qk_norm else None
    got = norm_rope(x, norm.weight if norm else None, 1e-6, cos, sin)
    want = rope.apply_rotary(norm(x) if norm else x, cos, sin)
    _close(got, want)


def test_norm_rope_reads_a_strided_view() -> None:
    """q/k are views of a projection's output; a non-contiguous one is handled, not misread."""
    from slmserve.kernels.fused import norm_rope

    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 6, 16, generator=gen).to(DEVICE)
    x = wide[:, ::2, :]  # every other head: strided along the heads
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, 16, 2).float() / 16))
    cos, sin = rope.cos_sin(torch.arange(4, device=DEVICE), inv_freq.to(DEVICE), 1.0, x.dtype)
    _close(norm_rope(x, None, 0.0, cos, sin), rope.apply_rotary(x, cos, sin))


@FUZZ
@given(
    rows=st.sampled_from([1, 4]),
    n=st.sampled_from([8, 96, 1024, 1500]),
    dtype=DTYPES,
    seed=st.integers(0, 100),
)
def test_silu_mul_matches_torch(rows: int, n: int, dtype: torch.dtype, seed: int) -> None:
    from slmserve.kernels.fused import silu_mul

    gen = torch.Generator().manual_seed(seed)
    gate = (4 * torch.randn(rows, n, generator=gen)).to(DEVICE, dtype)
    up = torch.randn(rows, n, generator=gen).to(DEVICE, dtype)
    _close(silu_mul(gate, up), F.silu(gate) * up)


def test_empty_inputs() -> None:
    from slmserve.kernels.fused import add_rms_norm, norm_rope, silu_mul

    empty = torch.empty(0, 8, device=DEVICE)
    assert add_rms_norm(empty, torch.ones(8, device=DEVICE), 1e-6)[0].shape == (0, 8)
    assert silu_mul(empty, empty).shape == (0, 8)
    cos = torch.empty(0, 8, device=DEVICE)
    assert norm_rope(torch.empty(0, 2, 8, device=DEVICE), None, 0.0, cos, cos).shape == (0, 2, 8)
