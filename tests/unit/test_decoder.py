"""The native decoder against transformers: prefill, ragged extend/decode, pruned widths, rope."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import pytest
import torch
from checkpoints import hf_config, load_hf
from safetensors.torch import save_file

from slmserve.cache.kv_pool import KVPool
from slmserve.interfaces import ForwardBatch
from slmserve.models import rope
from slmserve.models.demo import write_byte_tokenizer
from slmserve.models.loader import NativeBackend, load_model

ATOL = 1e-4
NUM_SLOTS = 256
KINDS = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def models(llama_dir: Path, qwen2_dir: Path, qwen3_dir: Path) -> dict:
    """kind -> (our backend, transformers model), loaded once for the module."""
    dirs = {"llama": llama_dir, "qwen2": qwen2_dir, "qwen3": qwen3_dir}
    return {k: (load_model(d, device="cpu", dtype="float32"), load_hf(d)) for k, d in dirs.items()}


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


@dataclass
class Seq:
    """A sequence being run chunk by chunk; ``slots[i]`` holds token ``i``'s K/V."""

    tokens: list[int]
    slots: list[int]
    done: int = 0
    ref: torch.Tensor | None = field(default=None, repr=False)


def make_batch(step: list[tuple[Seq, int]]) -> ForwardBatch:
    """One ragged step: ``n`` new tokens of each sequence; hidden states at every new token."""
    ids, pos, out, ctx, new_lens, ctx_lens = [], [], [], [], [], []
    for seq, n in step:
        a, b = seq.done, seq.done + n
        ids += seq.tokens[a:b]
        pos += range(a, b)
        out += seq.slots[a:b]
        ctx += seq.slots[:b]
        new_lens.append(n)
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


def to_device(batch: ForwardBatch, device: str) -> ForwardBatch:
    tensors = {f: getattr(batch, f) for f in batch.__dataclass_fields__}
    return ForwardBatch(
        **{f: v.to(device) if isinstance(v, torch.Tensor) else v for f, v in tensors.items()}
    )


def run_step(backend: NativeBackend, kv: KVPool, step: list[tuple[Seq, int]]) -> None:
    """Run a step and check every new token's logits against the sequence's reference."""
    logits = backend.logits(backend.forward(make_batch(step), kv))
    row = 0
    for seq, n in step:
        expected = seq.ref[seq.done : seq.done + n]
        torch.testing.assert_close(logits[row : row + n], expected, atol=ATOL, rtol=0)
        row += n
        seq.done += n


def test_rows_match_transformers_logits(models: dict) -> None:
    """The helpers themselves: a wrong reference row would make every test below vacuous."""
    _, hf = models["qwen3"]
    tokens = torch.randint(0, 259, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = hf_logits(hf, tokens)
    assert not torch.allclose(ref[3], ref[4], atol=0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_single_prefill_matches_transformers(models: dict, kind: str) -> None:
    backend, hf = models[kind]
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (48,), generator=gen).tolist()
    slots = torch.randperm(NUM_SLOTS, generator=gen)[:48].tolist()
    seq = Seq(tokens, slots, ref=hf_logits(hf, tokens))
    kv = KVPool(backend.info.kv_layout, NUM_SLOTS, dtype=torch.float32)
    run_step(backend, kv, [(seq, 48)])


@pytest.mark.parametrize("kind", KINDS)
def test_ragged_chunks_shared_prefix_and_decode(models: dict, kind: str) -> None:
    """Chunked prefill, a prefix shared through slots, fresh prefill and decode in one batch."""
    backend, hf = models[kind]
    gen = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(0, 300, (n,), generator=gen).tolist()  # noqa: E731
    free = iter(torch.randperm(NUM_SLOTS, generator=gen).tolist())
    take = lambda n: [next(free) for _ in range(n)]  # noqa: E731

    a = Seq(rand(23), take(23))
    b = Seq(rand(16), take(16))
    c = Seq(rand(10), take(10))
    # d reuses a's first 12 tokens *and their slots* (a radix-cache hit): it starts at 12.
    d = Seq(a.tokens[:12] + rand(9), a.slots[:12] + take(9), done=12)
    e = Seq(rand(11), take(11))
    for s in (a, b, c, d, e):
        s.ref = hf_logits(hf, s.tokens)

    kv = KVPool(backend.info.kv_layout, NUM_SLOTS, dtype=torch.float32)
    run_step(backend, kv, [(a, 12), (b, 5), (c, 7)])  # two partial chunks and a full prefill
    run_step(backend, kv, [(a, 8), (c, 1), (b, 8), (d, 6)])  # extends around one decode
    run_step(backend, kv, [(a, 1), (e, 9), (b, 1), (c, 1), (d, 1)])  # decodes + fresh prefill
    run_step(backend, kv, [(d, 1), (b, 1), (a, 1), (c, 1), (e, 1)])  # decode only
    run_step(backend, kv, [(e, 1), (a, 1), (b, 1), (d, 1)])


def test_forward_returns_only_requested_rows_and_touches_only_out_slots(models: dict) -> None:
    backend, _ = models["llama"]
    kv = KVPool(backend.info.kv_layout, NUM_SLOTS, dtype=torch.float32)
    for t in (*kv.k, *kv.v):
        t.normal_()
    before = [t.clone() for t in (*kv.k, *kv.v)]
    seq = Seq(list(range(40, 50)), list(range(100, 110)))
    batch = make_batch([(seq, 10)])
    batch.logit_indices = torch.tensor([], dtype=torch.int64)  # a non-final prefill chunk
    hidden = backend.forward(batch, kv)
    assert hidden.shape == (0, backend.info.hidden_size)
    untouched = torch.ones(NUM_SLOTS, dtype=torch.bool)
    untouched[100:110] = False
    for old, new in zip(before, (*kv.k, *kv.v)):
        assert torch.equal(old[untouched], new[untouched])
        assert not torch.equal(old[~untouched], new[~untouched])


@pytest.mark.parametrize("kind", KINDS)
def test_logits_for_vocab_ids_equal_full_columns(models: dict, kind: str) -> None:
    backend, _ = models[kind]
    hidden = torch.randn(5, backend.info.hidden_size, generator=torch.Generator().manual_seed(3))
    full = backend.logits(hidden)
    ids = torch.tensor([7, 299, 0, 42])
    part = backend.logits(hidden, ids)
    assert full.dtype == part.dtype == torch.float32
    assert full.shape == (5, 300) and part.shape == (5, 4)
    torch.testing.assert_close(part, full[:, ids], atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------
# Per-layer widths (pruned models)
# -------------------------------------------------------------------------------------------

# Per layer: kept MLP neurons (of 128) and kept KV heads (of 2; each owns 2 query heads).
PRUNE = [
    {"neurons": list(range(0, 128, 3)), "kv_heads": [1]},
    {"neurons": list(range(50, 98)), "kv_heads": [0, 1]},
]


def prune(hf, out_dir: Path, head_dim: int) -> None:
    """Write a sliced checkpoint with ``layer_shapes``, and mask ``hf`` the equivalent way.

    Dropping neurons = zeroing their down_proj columns; dropping a KV head with its query
    heads = zeroing those heads' o_proj columns. The masked transformers model then computes
    exactly what the smaller pruned model computes.
    """
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    shapes = []
    group = hf.config.num_attention_heads // hf.config.num_key_value_heads
    for i, p in enumerate(PRUNE):
        pre = f"model.layers.{i}."
        neurons = torch.tensor(p["neurons"])
        q_heads = [h for kv in p["kv_heads"] for h in range(kv * group, (kv + 1) * group)]
        q_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in q_heads])
        kv_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in p["kv_heads"]])
        for name in ("gate_proj", "up_proj"):
            state[f"{pre}mlp.{name}.weight"] = state[f"{pre}mlp.{name}.weight"][neurons]
        state[f"{pre}mlp.down_proj.weight"] = state[f"{pre}mlp.down_proj.weight"][:, neurons]
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for suffix in ("weight", "bias"):
                key = f"{pre}self_attn.{name}.{suffix}"
                if key in state:
                    state[key] = state[key][rows]
        o = f"{pre}self_attn.o_proj.weight"
        state[o] = state[o][:, q_rows]
        shapes.append(
            {
                "intermediate_size": len(p["neurons"]),
                "num_attention_heads": len(q_heads),
                "num_key_value_heads": len(p["kv_heads"]),
            }
        )
        with torch.no_grad():
            layer = hf.model.layers[i]
            dropped = torch.ones(hf.config.intermediate_size, dtype=torch.bool)
            dropped[neurons] = False
            layer.mlp.down_proj.weight[:, dropped] = 0
            kept = torch.zeros(hf.config.num_attention_heads * head_dim, dtype=torch.bool)
            kept[q_rows] = True
            layer.self_attn.o_proj.weight[:, ~kept] = 0
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out_dir.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    config = hf.config.to_dict()
    config["layer_shapes"] = shapes
    (out_dir / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(out_dir)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_per_layer_widths_match_masked_transformers(
    tmp_path: Path, qwen2_dir: Path, qwen3_dir: Path, kind: str
) -> None:
    src = {"qwen2": qwen2_dir, "qwen3": qwen3_dir}[kind]
    hf = load_hf(src)
    head_dim = getattr(hf.config, "head_dim", None) or 64 // 4
    prune(hf, tmp_path / "pruned", head_dim)
    backend = load_model(tmp_path / "pruned", device="cpu")
    assert backend.info.kv_layout == [(1, head_dim), (2, head_dim)]
    assert backend.decoder.model.layers[0].mlp.down_proj.weight.shape == (64, 43)

    gen = torch.Generator().manual_seed(4)
    free = iter(torch.randperm(NUM_SLOTS, generator=gen).tolist())
    seqs = []
    for n in (14, 9):
        tokens = torch.randint(0, 300, (n,), generator=gen).tolist()
        seqs.append(Seq(tokens, [next(free) for _ in range(n)], ref=hf_logits(hf, tokens)))
    unmasked = hf_logits(load_hf(src), seqs[0].tokens)
    assert (unmasked - seqs[0].ref).abs().max() > 0.01  # the pruning does change the model
    kv = KVPool(backend.info.kv_layout, NUM_SLOTS, dtype=torch.float32)
    run_step(backend, kv, [(seqs[0], 10), (seqs[1], 7)])
    run_step(backend, kv, [(seqs[0], 4), (seqs[1], 1)])
    run_step(backend, kv, [(seqs[1], 1)])


def test_layer_shapes_are_validated() -> None:
    from slmserve.models.decoder import DecoderConfig

    cfg = hf_config("qwen3").to_dict()
    cfg["layer_shapes"] = [{"num_attention_heads": 3}, {}]
    with pytest.raises(ValueError, match="not a multiple"):
        DecoderConfig.from_hf(cfg)
    cfg["layer_shapes"] = [{}]
    with pytest.raises(ValueError, match="num_hidden_layers is 2"):
        DecoderConfig.from_hf(cfg)
    cfg["layer_shapes"] = [{"intermediate": 3}, {}]
    with pytest.raises(ValueError, match="unknown keys"):
        DecoderConfig.from_hf(cfg)


# -------------------------------------------------------------------------------------------
# Rotary embeddings
# -------------------------------------------------------------------------------------------

ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 500_000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 1_000_000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "rope_theta": 10_000.0,
        "factor": 40.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 16,
        "original_max_position_embeddings": 4096,
    },
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_frequencies_match_transformers(case: str) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = ROPE_CASES[case]
    config = hf_config(
        "qwen3", head_dim=128, max_position_embeddings=32768, rope_parameters=dict(params)
    )
    ours, scale = rope.inv_freq_and_scale(
        rope.rope_parameters(config.to_dict()), 128, config.max_position_embeddings
    )
    if params["rope_type"] == "default":
        ref = 1.0 / (params["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
        ref_scale = 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


def test_rope_legacy_rope_scaling_and_unsupported_types() -> None:
    legacy = {
        "max_position_embeddings": 1024,
        "rope_theta": 5.0,
        "rope_scaling": {"type": "yarn", "factor": 2.0},
    }
    params = rope.rope_parameters(legacy)
    assert params["rope_type"] == "yarn" and params["rope_theta"] == 5.0
    assert params["original_max_position_embeddings"] == 1024
    with pytest.raises(ValueError, match=r"dynamic.*supported: default, linear, llama3, yarn"):
        rope.rope_parameters({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})


def test_yarn_model_matches_transformers(tmp_path: Path) -> None:
    """YaRN also scales cos/sin (attention factor): check it end to end."""
    from checkpoints import build_checkpoint

    yarn = {**ROPE_CASES["yarn"], "original_max_position_embeddings": 64, "rope_theta": 1e4}
    path = build_checkpoint("qwen3", tmp_path / "yarn", rope_parameters=yarn)
    backend, hf = load_model(path, device="cpu"), load_hf(path)
    tokens = list(range(3, 83))
    seq = Seq(tokens, list(range(80)), ref=hf_logits(hf, tokens))
    kv = KVPool(backend.info.kv_layout, NUM_SLOTS, dtype=torch.float32)
    run_step(backend, kv, [(seq, 70)])
    run_step(backend, kv, [(seq, 1)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_device_sync(llama_dir: Path) -> None:
    backend = load_model(llama_dir, device="cuda", dtype="float32")
    kv = KVPool(backend.info.kv_layout, NUM_SLOTS, dtype=torch.float32, device="cuda")
    a, b = Seq(list(range(20)), list(range(20))), Seq(list(range(12)), list(range(30, 42)))
    for step in ([(a, 12), (b, 9)], [(a, 1), (b, 1)], [(b, 1), (a, 3)]):
        batch = to_device(make_batch(step), "cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            backend.logits(backend.forward(batch, kv))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for seq, n in step:
            seq.done += n
