"""The Triton attention path against the torch reference path.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET`` is
read when a kernel is decorated, so it is set here before any kernel module is imported. On a
CUDA machine the same tests run the compiled kernels on the GPU. Shapes stay tiny because the
interpreter executes every program instance in Python.
"""

from __future__ import annotations

import math
import os
from itertools import accumulate
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from slmserve.interfaces import ForwardBatch
from slmserve.kernels import triton_available
from slmserve.models.attention import attend, plan_attention, resolve_backend, write_kv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
KV_HEADS = 2


def ragged_batch(
    shapes: list[tuple[int, int]], num_slots: int, gen: torch.Generator, share: bool = False
) -> ForwardBatch:
    """``shapes`` = (cached, new) per sequence, contexts at shuffled pool slots. With ``share``
    every later sequence's cached prefix starts with sequence 0's first slots (a prefix hit)."""
    perm = iter(torch.randperm(num_slots, generator=gen).tolist())
    contexts: list[list[int]] = []
    for c, n in shapes:
        shared = contexts[0][: min(c, shapes[0][0])] if share and contexts else []
        contexts.append(shared + [next(perm) for _ in range(c + n - len(shared))])
    new_lens = [n for _, n in shapes]
    ctx_lens = [c + n for c, n in shapes]
    total = sum(new_lens)
    t = torch.tensor
    return ForwardBatch(
        input_ids=torch.zeros(total, dtype=torch.int64, device=DEVICE),
        positions=t([p for c, n in shapes for p in range(c, c + n)], device=DEVICE),
        out_slots=t([s for ctx, n in zip(contexts, new_lens) for s in ctx[-n:]], device=DEVICE),
        cu_new=t([0, *accumulate(new_lens)], device=DEVICE),
        context_slots=t([s for ctx in contexts for s in ctx], device=DEVICE),
        cu_ctx=t([0, *accumulate(ctx_lens)], device=DEVICE),
        logit_indices=torch.arange(total, device=DEVICE),
        new_lens=new_lens,
        ctx_lens=ctx_lens,
    )


def random_inputs(
    batch: ForwardBatch, num_slots: int, group: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch.num_tokens, KV_HEADS * group, head_dim, generator=gen)
    k = torch.randn(num_slots, KV_HEADS, head_dim, generator=gen)
    v = torch.randn(num_slots, KV_HEADS, head_dim, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def reference(q, k_pool, v_pool, batch: ForwardBatch, scale: float) -> torch.Tensor:
    """The torch path in float32 on the same (possibly bf16-rounded) inputs."""
    plan = plan_attention(batch, "torch")
    return attend(q.float(), k_pool.float(), v_pool.float(), plan, scale)


TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@needs_triton
# No shrinking: in the interpreter it takes minutes; the failing example is printed as found.
@settings(max_examples=15, deadline=None, derandomize=True, phases=[Phase.generate])
@given(
    shapes=st.lists(
        st.tuples(st.sampled_from([0, 0, 1, 7, 63, 64, 150]), st.sampled_from([1, 1, 2, 5, 65])),
        min_size=1,
        max_size=4,
    ),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([16, 24]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    share=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_triton_attention_matches_torch_path(
    shapes: list[tuple[int, int]],
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    share: bool,
    seed: int,
) -> None:
    """Mixed decode and extend sequences: zero or long cached prefixes, one-token extends,
    chunks crossing block edges, shared prefix slots, GQA 1/2/4, fp32 and bf16."""
    num_slots = 1024
    batch = ragged_batch(shapes, num_slots, torch.Generator().manual_seed(seed), share)
    q, k_pool, v_pool = random_inputs(batch, num_slots, group, head_dim, dtype, seed)
    scale = 1 / math.sqrt(head_dim)
    got = attend(q, k_pool, v_pool, plan_attention(batch, "triton"), scale)
    assert got.dtype == dtype
    tol = TOLERANCE[dtype]
    want = reference(q, k_pool, v_pool, batch, scale)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@needs_triton
@settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.generate])
@given(
    shapes=st.lists(
        st.tuples(st.sampled_from([0, 3, 64, 150]), st.sampled_from([2, 5, 33, 65])),
        min_size=1,
        max_size=3,
    ),
    group=st.sampled_from([1, 2, 4]),
    tile=st.sampled_from([(16, 32, 4), (32, 64, 4), (16, 16, 2)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_extend_tiles_and_packed_gqa_match_torch_path(
    shapes: list[tuple[int, int]],
    group: int,
    tile: tuple[int, int, int],
    dtype: torch.dtype,
    seed: int,
) -> None:
    """Other tiles, and one program per KV head (the group's query heads stacked as rows),
    compute the same attention as the torch path."""
    from slmserve.kernels.extend import extend_attention

    batch = ragged_batch(shapes, 1024, torch.Generator().manual_seed(seed))
    q, k_pool, v_pool = random_inputs(batch, 1024, group, 16, dtype, seed)
    want = reference(q, k_pool, v_pool, batch, 0.25)
    seqs = torch.arange(len(shapes), device=DEVICE)
    for pack_gqa in (False, True):
        out = torch.full_like(q, float("nan"))
        extend_attention(
            q, k_pool, v_pool, out, seqs=seqs, max_new=max(batch.new_lens), cu_new=batch.cu_new,
            cu_ctx=batch.cu_ctx, context_slots=batch.context_slots, scale=0.25, tile=tile,
            pack_gqa=pack_gqa,
        )  # fmt: skip
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 4, 16])
def test_decode_splits_and_empty_contexts(num_splits: int) -> None:
    """Split counts above and below the context lengths agree; an empty context (a CUDA-graph
    padding row) gives zeros, not NaN, and rows map to their own sequences."""
    from slmserve.kernels.decode import decode_attention

    shapes = [(0, 1), (2, 1), (130, 1), (40, 1)]
    batch = ragged_batch(shapes, 512, torch.Generator().manual_seed(0))
    q, k_pool, v_pool = random_inputs(batch, 512, 2, 16, torch.float32, 0)
    want = reference(q, k_pool, v_pool, batch, 0.25)
    cu_ctx = batch.cu_ctx.clone()
    cu_ctx[1:] -= 1  # the first sequence's context becomes empty, the others keep theirs...
    slots = batch.context_slots[1:]  # ...because its only slot is dropped from the front
    out = torch.full_like(q, float("nan"))
    seqs = torch.tensor([3, 0, 1, 2], device=DEVICE)
    decode_attention(
        q,
        k_pool,
        v_pool,
        out,
        seqs=seqs,
        rows=seqs,
        cu_ctx=cu_ctx,
        context_slots=slots,
        scale=0.25,
        num_splits=num_splits,
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], want[1:], atol=2e-5, rtol=2e-5)


@needs_triton
def test_store_kv_skips_negative_slots_and_casts() -> None:
    from slmserve.kernels.kv_store import store_kv

    gen = torch.Generator().manual_seed(0)
    k = torch.randn(4, 2, 24, generator=gen).to(DEVICE)
    v = torch.randn(4, 2, 24, generator=gen).to(DEVICE)
    k_pool = torch.zeros(16, 2, 24, dtype=torch.bfloat16, device=DEVICE)
    v_pool = torch.zeros_like(k_pool)
    store_kv(k, v, k_pool, v_pool, torch.tensor([5, -1, 0, 9], device=DEVICE))
    for row, slot in ((0, 5), (2, 0), (3, 9)):
        assert torch.equal(k_pool[slot], k[row].to(torch.bfloat16))
        assert torch.equal(v_pool[slot], v[row].to(torch.bfloat16))
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[[5, 0, 9]] = False
    assert not k_pool[untouched.to(DEVICE)].any() and not v_pool[untouched.to(DEVICE)].any()


@needs_triton
def test_write_kv_then_attend_matches_torch_path() -> None:
    """The whole per-layer sequence (store, then attend over the pool) on both paths."""
    shapes = [(9, 4), (0, 3), (20, 1)]
    batch = ragged_batch(shapes, 128, torch.Generator().manual_seed(1))
    q, k_pool, v_pool = random_inputs(batch, 128, 2, 16, torch.float32, 1)
    k_new, v_new = torch.randn(2, batch.num_tokens, KV_HEADS, 16, device=DEVICE)
    outs = []
    for backend in ("torch", "triton"):
        kp, vp = k_pool.clone(), v_pool.clone()
        plan = plan_attention(batch, backend)
        write_kv(kp, vp, k_new, v_new, plan)
        outs.append((kp, vp, attend(q, kp, vp, plan, 0.25)))
    (kp_t, vp_t, o_t), (kp_k, vp_k, o_k) = outs
    assert torch.equal(kp_t, kp_k) and torch.equal(vp_t, vp_k)
    torch.testing.assert_close(o_k, o_t, atol=2e-5, rtol=2e-5)


def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; valid: auto"):
        resolve_backend("flash", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr("slmserve.kernels.triton_available", lambda: True)
    with pytest.raises(ValueError, match="needs a CUDA device, not 'cpu'"):
        resolve_backend("triton", cpu)
    monkeypatch.setattr("slmserve.kernels.triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        resolve_backend("triton", torch.device("cuda"))
    assert resolve_backend("auto", torch.device("cuda")) == "torch"


def test_backend_option_reaches_the_decoder(
    qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slmserve.plugins import PluginManager

    factory = PluginManager(load_entrypoints=False).backends.get("native")
    backend = factory(str(qwen3_dir), device="cpu", dtype="float32", attention="torch")
    assert backend.decoder.attention == "torch" and not backend.supports_cuda_graphs
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention backend"):
        factory(str(qwen3_dir), device="cpu", dtype="float32", attention="triton")


def _steps(gen: torch.Generator) -> list[list[tuple[list[int], list[int], int, int]]]:
    """Three engine-like steps over two sequences sharing a prefix: prefill chunks, an extend
    around a decode, then decodes. Entries are (tokens, slots, start, end)."""
    a = torch.randint(0, 300, (40,), generator=gen).tolist()
    free = torch.randperm(400, generator=gen).tolist()
    sa = free[:40]
    b = a[:16] + torch.randint(0, 300, (14,), generator=gen).tolist()
    sb = sa[:16] + free[40:54]
    return [
        [(a, sa, 0, 30)],
        [(a, sa, 30, 31), (b, sb, 16, 29)],
        [(b, sb, 29, 30), (a, sa, 31, 32)],
    ]


def _step_batch(step: list[tuple[list[int], list[int], int, int]]) -> ForwardBatch:
    ids, pos, out, ctx, new_lens, ctx_lens = [], [], [], [], [], []
    for tokens, slots, a, b in step:
        ids += tokens[a:b]
        pos += range(a, b)
        out += slots[a:b]
        ctx += slots[:b]
        new_lens.append(b - a)
        ctx_lens.append(b)
    t = torch.tensor
    return ForwardBatch(
        input_ids=t(ids),
        positions=t(pos),
        out_slots=t(out),
        cu_new=t([0, *accumulate(new_lens)]),
        context_slots=t(ctx),
        cu_ctx=t([0, *accumulate(ctx_lens)]),
        logit_indices=torch.arange(len(ids)),
        new_lens=new_lens,
        ctx_lens=ctx_lens,
    )


@needs_triton
@pytest.mark.skipif(CUDA, reason="the CPU interpreter check; CUDA runs the engine tests")
@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_logits_match_torch_path(kind: str, request: pytest.FixtureRequest) -> None:
    """The tiny checkpoints (Qwen3: q/k norms; Qwen2: q/k/v biases; Llama: llama3 rope, untied
    head) through the native decoder, every new token's logits, with the Triton path under the
    interpreter (attention, fused element-wise kernels, merged projections) and the torch path."""
    from slmserve.cache.kv_pool import KVPool
    from slmserve.models.loader import load_model

    path = request.getfixturevalue(f"{kind}_dir")
    logits, states = {}, {}
    for attention in ("torch", "triton"):
        backend = load_model(path, device="cpu", dtype="float32", attention=attention)
        decoder = backend.decoder
        assert decoder.attention == attention
        layer = decoder.model.layers[0]
        assert (layer.self_attn.merged is not None) == (attention == "triton")
        assert (layer.mlp.merged is not None) == (attention == "triton")
        if layer.self_attn.merged is not None:  # views, not copies: no memory added
            storage = layer.self_attn.merged.weight.untyped_storage().data_ptr()
            assert layer.self_attn.v_proj.weight.untyped_storage().data_ptr() == storage
        states[attention] = decoder.state_dict()
        kv = KVPool(backend.info.kv_layout, 400, dtype=torch.float32)
        steps = _steps(torch.Generator().manual_seed(0))
        logits[attention] = [backend.logits(backend.forward(_step_batch(s), kv)) for s in steps]
    # Merging keeps every parameter's name and value (they became views of the merged matrix).
    assert states["torch"].keys() == states["triton"].keys()
    assert all(torch.equal(states["torch"][k], states["triton"][k]) for k in states["torch"])
    for want, got in zip(logits["torch"], logits["triton"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="the CPU interpreter check; CUDA runs the engine tests")
def test_qwen3_engine_greedy_tokens_match_torch_path(qwen3_dir: Path) -> None:
    """The whole engine (chunked prefill, prefix hits, decode) with each attention backend;
    the Triton one as on CUDA, with each step launched before the last is collected."""
    from slmserve import Engine, EngineConfig, SamplingParams

    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 256, (20,), generator=gen).tolist()
    prompts = [shared + torch.randint(3, 256, (n,), generator=gen).tolist() for n in (3, 9, 1)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = {}
    for attention in ("torch", "triton"):
        config = EngineConfig(
            model=str(qwen3_dir),
            device="cpu",
            dtype="float32",
            kv_tokens=256,
            chunked_prefill_size=16,
            backend_options={"attention": attention},
            overlap="on" if attention == "triton" else "off",
        )
        results = Engine(config).generate_batch(prompts, params)
        outputs[attention] = [r.token_ids for r in results]
    assert all(len(t) == 6 for t in outputs["torch"])
    assert outputs["triton"] == outputs["torch"]
