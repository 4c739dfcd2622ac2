"""Pruning real (tiny) transformers models: calibration, sequential statistics, packing, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import load_hf
from safetensors import safe_open

from slmserve.cache.kv_pool import KVPool
from slmserve.interfaces import ForwardBatch, PluginError
from slmserve.models.loader import load_tokenizer
from slmserve.plugins import PluginManager
from slmserve.prune.calibration import (
    GramCollector,
    Windows,
    make_windows,
    read_documents,
    token_stream,
)
from slmserve.prune.gram import relative_error
from slmserve.prune.pack import count_parameters, pack_model, save_packed
from slmserve.prune.pipeline import PruneOptions, plan_budgets, prune_model

TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the fire. " * 6,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 8,
    "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow. " * 6,
]


def windows_for(path: Path, samples: int = 6, seq_len: int = 48) -> Windows:
    return make_windows(token_stream(load_tokenizer(path), TEXT), samples, seq_len)


def test_read_documents(tmp_path: Path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("one document\nover two lines")
    assert read_documents(txt) == ["one document\nover two lines"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('"plain string"\n\n{"text": "an object"}\n')
    assert read_documents(jsonl) == ["plain string", "an object"]
    jsonl.write_text('{"text": "fine"}\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2"):
        read_documents(jsonl)
    jsonl.write_text("not json\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: not valid JSON"):
        read_documents(jsonl)
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        read_documents(tmp_path / "missing.txt")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        read_documents(tmp_path / "c.csv")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_documents(tmp_path / "e.txt")


def test_windows_spread_over_the_stream_and_pad_the_tail() -> None:
    stream = list(range(1, 101))
    w = make_windows(stream, samples=3, seq_len=30, pad_id=0)
    assert w.ids[:, 0].tolist() == [1, 61, 91]  # 4 windows available, 3 spread (ends kept)
    assert w.mask[2].sum() == 10 and w.ids[2, 10:].eq(0).all()
    assert w.num_tokens == 70
    assert make_windows(stream, samples=10, seq_len=30).ids.shape == (4, 30)


def test_gram_leaves_padding_out() -> None:
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    collector = GramCollector(lin)
    collector.mask = mask
    lin(x)
    gram = collector.close()
    real = x[mask].double()
    torch.testing.assert_close(gram, real.t() @ real)
    assert collector.tokens == 4
    lin(x)  # the hook is gone
    assert collector.tokens == 4


def test_budgets_are_checked(qwen3_dir: Path) -> None:
    model = load_hf(qwen3_dir)  # 2 layers, MLP 128, 2 KV heads
    assert [(b.mlp_keep, b.kv_keep) for b in plan_budgets(model, 0.6, 0.5)] == [(77, 1)] * 2
    assert [b.mlp_keep for b in plan_budgets(model, [1.0, 0.25], 1.0)] == [128, 32]
    with pytest.raises(ValueError, match="whole number"):
        plan_budgets(model, 1.0, 0.75)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        plan_budgets(model, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        plan_budgets(model, 1.5, 1.0)
    with pytest.raises(ValueError, match="3 values given for 2 layers"):
        plan_budgets(model, [0.5, 0.5, 0.5], 1.0)


def test_statistics_are_sequential(llama_dir: Path) -> None:
    """Each layer's reported error is measured on inputs from the already pruned layers.

    Running the finished (masked) model over the calibration windows reproduces, layer by
    layer, exactly the inputs the pruner saw; a pruner that collected statistics on the dense
    model would report different errors for every layer after the first.
    """
    model = load_hf(llama_dir)
    windows = windows_for(llama_dir)
    result = prune_model(model, windows, plan_budgets(model, 0.5, 0.5), PruneOptions())
    layers = model.model.layers
    collectors = [
        (GramCollector(layer.self_attn.o_proj), GramCollector(layer.mlp.down_proj))
        for layer in layers
    ]
    for pair in collectors:
        for c in pair:
            c.mask = windows.mask
    with torch.no_grad():
        model(input_ids=windows.ids, attention_mask=windows.mask.long())
    for layer, res, (co, cd) in zip(layers, result.layers, collectors):
        attn = relative_error(co.close(), res.dense_o, layer.self_attn.o_proj.weight)
        mlp = relative_error(cd.close(), res.dense_down, layer.mlp.down_proj.weight)
        assert attn == pytest.approx(res.attn_error, rel=1e-6)
        assert mlp == pytest.approx(res.mlp_error, rel=1e-6)
        assert 0 < res.mlp_error < 1 and 0 < res.attn_error < 1


def test_every_method_keeps_the_budget(qwen2_dir: Path) -> None:
    windows = windows_for(qwen2_dir, samples=4, seq_len=32)
    errors = {}
    for method in ("magnitude", "magnitude-refit", "wanda", "osscar"):
        model = load_hf(qwen2_dir)
        result = prune_model(model, windows, plan_budgets(model, 0.5, 1.0), PruneOptions(method))
        for layer, res in zip(model.model.layers, result.layers):
            assert len(res.mlp_kept) == 64 and len(res.kv_kept) == 2
            dropped = torch.ones(128, dtype=torch.bool)
            dropped[res.mlp_kept] = False
            assert layer.mlp.down_proj.weight[:, dropped].eq(0).all()
        errors[method] = result.layers[0].mlp_error
    # Layer 0 sees the same inputs under every method: the refit can only help magnitude.
    assert errors["magnitude-refit"] <= errors["magnitude"]
    with pytest.raises(ValueError, match="local search applies to the osscar method"):
        PruneOptions("wanda", local_search=True)


def masked_and_packed(
    path: Path, out: Path, mlp_keep: object, kv_keep: object
) -> tuple[torch.Tensor, bool, torch.Tensor]:
    model = load_hf(path)
    result = prune_model(
        model, windows_for(path), plan_budgets(model, mlp_keep, kv_keep), PruneOptions()
    )
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = model(ids).logits
    uniform = pack_model(model, result, {"method": "osscar"})
    save_packed(model, out, path)
    return masked, uniform, ids


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_packed_model_equals_masked_model(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path: Path = request.getfixturevalue(f"{kind}_dir")
    dense_params = count_parameters(load_hf(path))
    masked, uniform, ids = masked_and_packed(path, tmp_path / "out", 0.5, 0.5)
    assert uniform
    reloaded = load_hf(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, masked, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    head_dim = 32 if kind == "qwen3" else 16
    assert (cfg["intermediate_size"], cfg["num_attention_heads"]) == (64, 2)
    assert (cfg["num_key_value_heads"], cfg["head_dim"]) == (1, head_dim)
    assert "layer_shapes" not in cfg and cfg["slmserve"]["pruning"]["method"] == "osscar"
    # parameters removed: per layer 64 neurons x 3 x hidden, and one KV group's q/k/v/o
    hidden, bias = 64, 1 if kind == "qwen2" else 0
    mlp = 64 * 3 * hidden
    attn = (2 * head_dim) * (2 * hidden + bias) + head_dim * 2 * (hidden + bias)
    assert count_parameters(reloaded) == dense_params - 2 * (mlp + attn)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        saved = set(fh.keys())
    assert ("lm_head.weight" in saved) == (kind != "qwen3")  # tied stays tied
    if kind == "qwen3":
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def prefill_logits(backend: object, tokens: list[int]) -> torch.Tensor:
    n = len(tokens)
    kv = KVPool(backend.info.kv_layout, 64, dtype=backend.dtype)
    ar = torch.arange(n)
    last = torch.tensor([n - 1])
    batch = ForwardBatch(
        torch.tensor(tokens), ar, ar, torch.tensor([0, n]), ar, torch.tensor([0, n]), last, [n], [n]
    )
    return backend.logits(backend.forward(batch, kv))


def test_uneven_layers_load_in_the_osscar_backend(qwen3_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    masked, uniform, ids = masked_and_packed(qwen3_dir, out, [0.75, 0.25], [1.0, 0.5])
    assert not uniform
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_shapes"] == [
        {"intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2},
        {"intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1},
    ]
    factory = PluginManager(load_entrypoints=False).backends.get("osscar")
    backend = factory(str(out), device="cpu", dtype="float32")
    assert backend.info.kv_layout == [(2, 32), (1, 32)]
    assert "pruned with osscar" in backend.info.description
    got = prefill_logits(backend, ids[0].tolist())
    torch.testing.assert_close(got[0], masked[0, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="mismatch"):
        load_hf(out)  # transformers cannot hold per-layer widths: it refuses


def test_osscar_backend_refuses_an_unpruned_checkpoint(qwen3_dir: Path) -> None:
    factory = PluginManager(load_entrypoints=False).backends.get("osscar")
    with pytest.raises(PluginError, match="--backend native"):
        factory(str(qwen3_dir), device="cpu")
    with pytest.raises(PluginError, match="give --model DIR"):
        factory(None)
