"""The CUDA fast-path plumbing that can be checked on a CPU: decode-graph padding (under the
Triton interpreter), the one-copy host stager, and the runner's one-fetch result collection.

Capture and replay themselves need a GPU: ``test_graph_replay_matches_eager`` runs only there.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from slmserve.engine.batch import HostStager
from slmserve.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from slmserve.kernels import triton_available

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(64)[-3:] == [32, 48, 64]


def test_host_stager_round_trips_arrays_in_one_buffer() -> None:
    stager = HostStager(DEVICE)
    arrays = [np.arange(5, dtype=np.int64), np.empty(0, np.int64), np.array([7, -1], np.int64)]
    out = stager.to_device(arrays)
    assert [t.tolist() for t in out] == [[0, 1, 2, 3, 4], [], [7, -1]]
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1  # one copy, views into it
    again = stager.to_device([np.arange(10_000, dtype=np.int64)])  # grows the buffer
    assert again[0][-1].item() == 9_999 and out[2].tolist() == [7, -1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_stager_never_refills_a_buffer_a_queued_copy_still_reads() -> None:
    """Copies queued behind a second of device work: more steps than the ring has buffers,
    each with its own values, all arrive intact (a refill must wait for its buffer's copy)."""
    stager = HostStager("cuda", depth=2)
    for _ in range(2):  # allocate both pinned buffers first (allocation may synchronise)
        stager.to_device([np.zeros(1000, np.int64)])
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    outs = [stager.to_device([np.full(1000, i, np.int64)])[0] for i in range(5)]
    torch.cuda.synchronize()
    assert [sorted(set(t.tolist())) for t in outs] == [[i] for i in range(5)]


def _decode_batch(gen: torch.Generator, num_seqs: int, num_slots: int):
    """A decode step of ``num_seqs`` sequences with shuffled slots (new token last)."""
    from itertools import accumulate

    from slmserve.interfaces import ForwardBatch

    lens = torch.randint(1, 40, (num_seqs,), generator=gen).tolist()
    perm = torch.randperm(num_slots, generator=gen).tolist()
    contexts, start = [], 0
    for n in lens:
        contexts.append(perm[start : start + n])
        start += n
    t = torch.tensor
    return ForwardBatch(
        input_ids=torch.randint(0, 300, (num_seqs,), generator=gen).to(DEVICE),
        positions=t([n - 1 for n in lens], device=DEVICE),
        out_slots=t([c[-1] for c in contexts], device=DEVICE),
        cu_new=torch.arange(num_seqs + 1, device=DEVICE),
        context_slots=t([s for c in contexts for s in c], device=DEVICE),
        cu_ctx=t([0, *accumulate(lens)], device=DEVICE),
        logit_indices=torch.arange(num_seqs, device=DEVICE),
        new_lens=[1] * num_seqs,
        ctx_lens=lens,
    )


@needs_triton
def test_padded_decode_batch_computes_what_the_batch_does(qwen3_dir: Path) -> None:
    """The static, padded batch a graph replays: same hidden states for the real rows, K/V
    written at the real slots only (padding rows carry slot -1 and an empty context)."""
    from slmserve.cache.kv_pool import KVPool
    from slmserve.models.loader import load_model

    backend = load_model(qwen3_dir, device=DEVICE, dtype="float32", attention="triton")
    kv = KVPool(backend.info.kv_layout, 300, dtype=torch.float32, device=DEVICE)
    for t in (*kv.k, *kv.v):
        t.normal_()
    graphs = DecodeGraphs(backend, kv, max_batch=8, max_ctx=64, ctx_capacity=256, capture=False)
    batch = _decode_batch(torch.Generator().manual_seed(0), 5, 300)
    assert graphs.fits(batch)
    before = [t.clone() for t in (*kv.k, *kv.v)]
    want = backend.forward(batch, kv)
    eager_pool = [t.clone() for t in (*kv.k, *kv.v)]
    for t, b in zip((*kv.k, *kv.v), before):
        t.copy_(b)
    static = graphs.padded(batch)
    assert static.num_seqs == 8 and static.out_slots[5:].tolist() == [-1, -1, -1]
    got = backend.forward(static, kv)
    torch.testing.assert_close(got[:5], want, atol=1e-5, rtol=1e-5)
    written = torch.zeros(300, dtype=torch.bool, device=DEVICE)
    written[batch.out_slots] = True
    for t, e, b in zip((*kv.k, *kv.v), eager_pool, before):
        assert torch.equal(t[~written], b[~written])  # padding rows wrote nothing
        torch.testing.assert_close(t[written], e[written], atol=1e-5, rtol=1e-5)
    assert not graphs.fits(_decode_batch(torch.Generator().manual_seed(1), 9, 300))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_graph_replay_matches_eager(qwen3_dir: Path) -> None:
    from slmserve.cache.kv_pool import KVPool
    from slmserve.models.loader import load_model

    backend = load_model(qwen3_dir, device="cuda", dtype="float32", attention="triton")
    kv = KVPool(backend.info.kv_layout, 300, dtype=torch.float32, device="cuda")
    graphs = DecodeGraphs(backend, kv, max_batch=8, max_ctx=64, ctx_capacity=256)
    for num_seqs in (1, 3, 8):
        batch = _decode_batch(torch.Generator().manual_seed(num_seqs), num_seqs, 300)
        want = backend.forward(batch, kv).clone()
        torch.testing.assert_close(graphs.run(batch), want, atol=1e-4, rtol=1e-4)


def test_score_groups_with_different_labels_in_one_step(demo_backend) -> None:
    """Two label sets (2 and 3 labels) in the same steps: each request gets its own rows back
    from the single flattened fetch."""
    from slmserve import Engine, EngineConfig

    items = [[65, 66, 67], [68, 69], [70]]

    async def run(labels_a, labels_b):
        async with Engine(EngineConfig(kv_tokens=2048), backend=demo_backend) as engine:
            return await asyncio.gather(
                engine.score([1, 2, 3, 4], items, label_token_ids=labels_a),
                engine.score([5, 6, 7], items, label_token_ids=labels_b),
            )

    a, b = asyncio.run(run([10, 20], [30, 40, 50]))
    (a_alone,) = asyncio.run(run([10, 20], [10, 20]))[:1]
    assert [len(s) for s in a.scores] == [2, 2, 2] and [len(s) for s in b.scores] == [3, 3, 3]
    for row in (*a.scores, *b.scores):
        assert abs(sum(row) - 1) < 1e-5
    np.testing.assert_allclose(a.scores, a_alone.scores, atol=1e-5)
    assert not np.allclose(np.array(b.scores)[:, :2], np.array(a.scores), atol=1e-3)
