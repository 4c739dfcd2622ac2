"""The torch attention path against a naive per-sequence computation, on random ragged steps."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmserve.interfaces import ForwardBatch
from slmserve.models.attention import PAD_SLACK, _group_by_size, attend, plan_attention

HEAD_DIM = 8


def ragged_batch(shapes: list[tuple[int, int]], num_slots: int, seed: int) -> ForwardBatch:
    """``shapes`` = (cached, new) per sequence; contexts at random distinct pool slots."""
    gen = torch.Generator().manual_seed(seed)
    ctx_lens = [c + n for c, n in shapes]
    new_lens = [n for _, n in shapes]
    slots = torch.randperm(num_slots, generator=gen)[: sum(ctx_lens)]
    contexts = list(torch.split(slots, ctx_lens))
    out_slots = torch.cat([ctx[c:] for ctx, (c, _) in zip(contexts, shapes)])
    cu = lambda xs: torch.tensor([0, *torch.tensor(xs).cumsum(0).tolist()])  # noqa: E731
    total = sum(new_lens)
    return ForwardBatch(
        input_ids=torch.zeros(total, dtype=torch.long),
        positions=torch.cat([torch.arange(c, c + n) for c, n in shapes]),
        out_slots=out_slots,
        cu_new=cu(new_lens),
        context_slots=slots,
        cu_ctx=cu(ctx_lens),
        logit_indices=torch.arange(total),
        new_lens=new_lens,
        ctx_lens=ctx_lens,
    )


def naive(q, k_pool, v_pool, batch: ForwardBatch, scale: float) -> torch.Tensor:
    """Per sequence, per head, explicit softmax(q k^T) v with the causal rule of ForwardBatch."""
    heads, kv_heads = q.shape[1], k_pool.shape[1]
    out = torch.empty_like(q)
    row = 0
    for i, (n, c) in enumerate(zip(batch.new_lens, batch.ctx_lens)):
        slots = batch.context_slots[int(batch.cu_ctx[i]) : int(batch.cu_ctx[i + 1])]
        k, v = k_pool[slots], v_pool[slots]
        for j in range(n):
            for h in range(heads):
                kh = h // (heads // kv_heads)
                seen = c - n + j + 1
                w = torch.softmax(k[:seen, kh] @ q[row + j, h] * scale, dim=0)
                out[row + j, h] = w @ v[:seen, kh]
        row += n
    return out


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 10)), min_size=1, max_size=7),
    group=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 1000),
)
def test_attend_matches_naive(shapes: list[tuple[int, int]], group: int, seed: int) -> None:
    kv_heads, num_slots = 2, 200
    batch = ragged_batch(shapes, num_slots, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(batch.num_tokens, kv_heads * group, HEAD_DIM, generator=gen)
    k_pool = torch.randn(num_slots, kv_heads, HEAD_DIM, generator=gen)
    v_pool = torch.randn(num_slots, kv_heads, HEAD_DIM, generator=gen)
    scale = 1 / math.sqrt(HEAD_DIM)
    got = attend(q, k_pool, v_pool, plan_attention(batch), scale)
    torch.testing.assert_close(got, naive(q, k_pool, v_pool, batch, scale), atol=1e-5, rtol=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 600), st.integers(0, 2000)), min_size=1, max_size=40))
def test_prefill_groups_cover_each_sequence_once_within_the_padding_bound(
    shapes: list[tuple[int, int]],
) -> None:
    new = [n for n, _ in shapes]
    ctx = [n + c for n, c in shapes]
    groups = _group_by_size(list(range(len(shapes))), new, ctx)
    assert sorted(i for g in groups for i in g) == list(range(len(shapes)))
    for g in groups:
        padded = len(g) * max(new[i] for i in g) * max(ctx[i] for i in g)
        assert padded <= PAD_SLACK * sum(new[i] * ctx[i] for i in g) or len(g) == 1


def test_equal_items_share_one_group() -> None:
    """The scoring shape: same-length extends over one prefix run as one SDPA call, and a long
    fresh prefill in the same step gets its own call instead of padding them all to its size."""
    batch = ragged_batch([(20, 5)] * 9 + [(0, 40)], num_slots=400, seed=0)
    plan = plan_attention(batch)
    assert [tuple(p.rows.shape) for p in plan.prefills] == [(1, 40), (9, 5)]
