"""Loading checkpoints: shards, dtypes, EOS ids, clear errors, the ``native`` plugin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmserve.cache.kv_pool import KVPool
from slmserve.interfaces import ForwardBatch, PluginError
from slmserve.models.loader import load_model
from slmserve.models.native import native_backend
from slmserve.plugins import PluginManager


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def prefill_logits(backend, tokens: list[int]) -> torch.Tensor:
    n = len(tokens)
    kv = KVPool(backend.info.kv_layout, 64, dtype=backend.dtype)
    ar = torch.arange(n)
    batch = ForwardBatch(
        torch.tensor(tokens), ar, ar, torch.tensor([0, n]), ar, torch.tensor([0, n]), ar, [n], [n]
    )
    return backend.logits(backend.forward(batch, kv))


def test_sharded_checkpoint_loads(qwen2_dir: Path) -> None:
    assert (qwen2_dir / "model.safetensors.index.json").is_file()
    assert len(list(qwen2_dir.glob("model-*-of-*.safetensors"))) > 1
    backend = load_model(qwen2_dir, device="cpu")
    info = backend.info
    assert info.architecture == "Qwen2ForCausalLM"
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (2, 64, 300)
    assert info.kv_layout == [(2, 16), (2, 16)]
    assert (info.dtype, info.device) == ("float32", "cpu")
    assert info.eos_token_ids == [258]
    assert info.max_position_embeddings == 256
    assert not info.random_weights
    assert backend.tokenizer.decode(backend.tokenizer.encode("héllo")) == "héllo"


def test_untied_and_tied_heads(llama_dir: Path, qwen3_dir: Path) -> None:
    llama, qwen3 = load_model(llama_dir, device="cpu"), load_model(qwen3_dir, device="cpu")
    assert llama.decoder.lm_head_weight is not llama.decoder.model.embed_tokens.weight
    assert qwen3.decoder.lm_head_weight is qwen3.decoder.model.embed_tokens.weight


def test_unknown_architecture_lists_supported(tmp_path: Path, qwen3_dir: Path) -> None:
    path = copy_dir(qwen3_dir, tmp_path / "m")
    edit_config(path, architectures=["MistralForCausalLM"], model_type="mistral")
    for exc in (ValueError, PluginError):
        with pytest.raises(exc) as err:
            load_model(path, device="cpu")
        msg = str(err.value)
        assert "MistralForCausalLM" in msg
        assert all(a in msg for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"))


def test_missing_directory_config_and_weights_are_named(tmp_path: Path, qwen3_dir: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"model directory .*nope.* does not exist"):
        load_model(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found .*empty"):
        load_model(empty)
    path = copy_dir(qwen3_dir, tmp_path / "noweights")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors .*noweights"):
        load_model(path, device="cpu")


def test_missing_shard_is_named(tmp_path: Path, qwen2_dir: Path) -> None:
    path = copy_dir(qwen2_dir, tmp_path / "m")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(path, device="cpu")


def test_weights_that_do_not_fit_the_config(tmp_path: Path, llama_dir: Path) -> None:
    path = copy_dir(llama_dir, tmp_path / "m")
    edit_config(path, intermediate_size=96)
    with pytest.raises(ValueError, match=r"(?s)do not match its config\.json.*mlp\.gate_proj"):
        load_model(path, device="cpu")


def test_bfloat16_loads_on_cpu_and_stays_close(llama_dir: Path) -> None:
    bf16 = load_model(llama_dir, device="cpu", dtype="bfloat16")
    assert bf16.info.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in bf16.decoder.parameters())
    assert bf16.decoder.inv_freq.dtype == torch.float32
    tokens = list(range(5, 25))
    low = prefill_logits(bf16, tokens)
    ref = prefill_logits(load_model(llama_dir, device="cpu"), tokens)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.25 * ref.abs().max()
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.7


def test_auto_dtype_on_cpu_ignores_checkpoint_dtype(tmp_path: Path, qwen3_dir: Path) -> None:
    path = copy_dir(qwen3_dir, tmp_path / "m")
    edit_config(path, dtype="bfloat16", torch_dtype="bfloat16")
    backend = load_model(path, device="cpu")
    assert backend.info.dtype == "float32" and backend.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(path, device="cpu", dtype="float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(qwen3_dir: Path) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(qwen3_dir, device="cuda")
    assert load_model(qwen3_dir).info.device == "cpu"  # auto


def test_eos_ids_from_config_and_generation_config(tmp_path: Path, qwen3_dir: Path) -> None:
    path = copy_dir(qwen3_dir, tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [256, 258]}))
    assert load_model(path, device="cpu").info.eos_token_ids == [258, 256]
    edit_config(path, eos_token_id=None)
    (path / "generation_config.json").unlink()
    assert load_model(path, device="cpu").info.eos_token_ids == [258]  # the tokenizer's


def test_native_plugin_is_registered_and_loads(qwen3_dir: Path) -> None:
    factory = PluginManager(load_entrypoints=False).backends.get("native")
    backend = factory(str(qwen3_dir), device="cpu", dtype="float32")
    assert backend.name == "native" and backend.info.architecture == "Qwen3ForCausalLM"
    with pytest.raises(TypeError, match="unknown native backend options: bogus"):
        native_backend(str(qwen3_dir), bogus=1)


def test_plugin_module_does_not_import_torch() -> None:
    code = (
        "import sys, slmserve.models.native, slmserve.models; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
