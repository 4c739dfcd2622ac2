"""The embedded demo model: a tiny Qwen3-shaped decoder with RANDOM weights, built locally.

It lets ``slmserve serve`` (and the test suite) run end to end with no download: its output is
meaningless text. The weights come from a fixed seed, so every machine builds the same model.
It is written once, in transformers' file format, to ``$SLMSERVE_CACHE_DIR/demo-<version>``
(default ``~/.cache/slmserve``), and then loaded by :func:`slmserve.models.loader.load_model`
like any other checkpoint.

The tokenizer is byte-level: 256 byte tokens (ids 0-255 are the byte values) plus ChatML
specials, so any Unicode text round-trips without merges.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEMO_VERSION = 1
"""Bump when the files change, so stale caches are not reused."""
DEMO_SEED = 0

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEMO_DESCRIPTION = (
    "slmserve demo model: a tiny Qwen3-shaped decoder with RANDOM weights (seeded); "
    "its output is meaningless, it exists to run the server without a download"
)

DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": BYTE_VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": True,
    "attention_bias": False,
    "use_sliding_window": False,
    "bos_token_id": None,
    "eos_token_id": IM_END_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "dtype": "float32",
    "slmserve": {"random_weights": True, "description": DEMO_DESCRIPTION},
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    out = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def build_byte_tokenizer() -> Any:
    """A ``tokenizers.Tokenizer``: ByteLevel, token id = byte value, ChatML specials after."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


def write_byte_tokenizer(path: str | Path, *, model_max_length: int = 4096) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the ChatML template).

    The files are what ``PreTrainedTokenizerFast.save_pretrained`` writes, so
    ``AutoTokenizer.from_pretrained(path)`` loads them.
    """
    path = Path(path)
    build_byte_tokenizer().save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHATML_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def demo_weights(config: dict[str, Any], seed: int = DEMO_SEED) -> dict[str, Any]:
    """Random weights for ``config``, in a fixed order from one seeded CPU generator.

    Matrices are normal with std ``fan_in ** -0.5`` (activations keep their scale through the
    layers); embeddings have std 0.5 so the logits are far apart and greedy decoding does not
    hinge on rounding; norm weights are ones.
    """
    import torch

    from slmserve.models.decoder import Decoder, DecoderConfig

    shapes = Decoder(DecoderConfig.from_hf(config)).state_dict()  # meta tensors: names, shapes
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in shapes.items():
        if meta.ndim == 1:
            state[name] = torch.ones(meta.shape)
        else:
            std = 0.5 if "embed_tokens" in name else meta.shape[1] ** -0.5
            state[name] = torch.randn(meta.shape, generator=gen) * std
    return state


def write_demo_model(path: str | Path, *, seed: int = DEMO_SEED) -> Path:
    """Write the demo checkpoint (config, weights, tokenizer) into directory ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**DEMO_CONFIG, "slmserve": {**DEMO_CONFIG["slmserve"], "seed": seed}}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "pad_token_id": ENDOFTEXT_ID}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(demo_weights(config, seed), str(path / "model.safetensors"), {"format": "pt"})
    write_byte_tokenizer(path, model_max_length=config["max_position_embeddings"])
    return path


def demo_cache_dir() -> Path:
    """Where the demo is cached: ``$SLMSERVE_CACHE_DIR`` or ``~/.cache/slmserve``."""
    base = os.environ.get("SLMSERVE_CACHE_DIR") or Path.home() / ".cache" / "slmserve"
    return Path(base) / f"demo-{DEMO_VERSION}"


def ensure_demo_model(path: str | Path | None = None) -> Path:
    """Return the demo checkpoint directory, building it on first use.

    The files are written to a temporary sibling directory that is then renamed into place, so
    a concurrent process either sees the complete model or builds its own copy and discards it.
    """
    final = Path(path) if path is not None else demo_cache_dir()
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
    try:
        write_demo_model(tmp)
        try:
            os.replace(tmp, final)
        except OSError as e:
            # Another process won the race (the target is now a non-empty directory).
            if not (final / "config.json").is_file():
                raise FileExistsError(
                    f"{final} exists but holds no demo model (no config.json); remove it"
                ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
