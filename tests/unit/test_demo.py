"""The embedded demo model: seeded, cached atomically, loadable by us and by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from slmserve.cache.kv_pool import KVPool
from slmserve.interfaces import ForwardBatch
from slmserve.models import demo
from slmserve.models.loader import NativeBackend, load_model
from slmserve.models.native import native_backend


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.ensure_demo_model(tmp_path_factory.mktemp("cache") / "demo")


@pytest.fixture(scope="module")
def backend(demo_dir: Path) -> NativeBackend:
    return load_model(demo_dir, device="cpu")


def test_weights_are_deterministic_from_the_seed(tmp_path: Path, demo_dir: Path) -> None:
    again = load_file(demo.ensure_demo_model(tmp_path / "again") / "model.safetensors")
    first = load_file(demo_dir / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = load_file(demo.write_demo_model(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_info_says_the_weights_are_random(backend: NativeBackend) -> None:
    info = backend.info
    assert info.random_weights is True
    assert "random" in info.description.lower()
    assert info.architecture == "Qwen3ForCausalLM"
    assert info.vocab_size == len(backend.tokenizer) == 259
    assert info.eos_token_ids == [demo.IM_END_ID, demo.ENDOFTEXT_ID]
    assert info.kv_layout == [(2, 32)] * 4


def test_native_factory_builds_the_demo_once_in_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLMSERVE_CACHE_DIR", str(tmp_path))
    first = native_backend(None, device="cpu")
    path = tmp_path / f"demo-{demo.DEMO_VERSION}"
    assert first.info.random_weights and (path / "model.safetensors").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert native_backend("demo", device="cpu").info.random_weights
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp dirs left


def test_losing_the_build_race_keeps_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process renames its copy into place while we build ours: we use theirs."""
    final = tmp_path / "demo"
    real_write = demo.write_demo_model

    def racing_write(path: Path, **kw: object) -> Path:
        real_write(final, seed=7)  # the other process finishes first
        return real_write(path)

    monkeypatch.setattr(demo, "write_demo_model", racing_write)
    assert demo.ensure_demo_model(final) == final
    assert '"seed": 7' in (final / "config.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_tokenizer_round_trips_any_text(backend: NativeBackend, text: str) -> None:
    tok = backend.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < 259 for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_ids_are_bytes_and_specials(backend: NativeBackend) -> None:
    tok = backend.tokenizer
    text = "A é 世 🎉\x00 \t\n"
    assert tok.encode(text, add_special_tokens=False) == list(text.encode())
    assert tok.convert_tokens_to_ids(list(demo.SPECIAL_TOKENS)) == [256, 257, 258]
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [258]
    assert tok.eos_token_id == demo.IM_END_ID


def test_chat_template_renders_chatml(backend: NativeBackend) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi ✓"},
    ]
    text = backend.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi ✓<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_transformers_reads_the_demo_and_agrees(demo_dir: Path, backend: NativeBackend) -> None:
    """The files are save_pretrained-compatible: transformers computes the same logits."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    tokens = list(b"hello, demo model")
    n = len(tokens)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    kv = KVPool(backend.info.kv_layout, 32, dtype=torch.float32)
    ar = torch.arange(n)
    batch = ForwardBatch(
        torch.tensor(tokens), ar, ar, torch.tensor([0, n]), ar, torch.tensor([0, n]), ar, [n], [n]
    )
    ours = backend.logits(backend.forward(batch, kv))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ref.std() > 1.0  # logits far apart: greedy decoding does not hinge on rounding
