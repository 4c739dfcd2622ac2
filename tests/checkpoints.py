"""Tiny random transformers checkpoints (+ byte-level tokenizer) built locally for tests.

``build_checkpoint(kind, path)`` writes what ``save_pretrained`` writes, so both transformers
and :func:`slmserve.models.loader.load_model` read it. The variants cover what the native
decoder must get right:

* ``llama``: llama3 rope scaling, untied LM head, head_dim 16;
* ``qwen2``: q/k/v biases, untied, saved in several shards;
* ``qwen3``: per-head q/k RMSNorm, tied embeddings, ``head_dim`` (32) != hidden / heads.

Weights use a larger init than transformers' default, and biases and norm weights are random
too (transformers zeroes biases and sets norms to one), so a mistake in a mask, a bias or a
norm changes the logits well beyond the test tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from slmserve.models.demo import write_byte_tokenizer

Kind = Literal["llama", "qwen2", "qwen3"]

COMMON: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.2,
    "eos_token_id": 258,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "llama": {
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10_000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "qwen2": {"tie_word_embeddings": False, "max_shard_size": "40KB"},
    "qwen3": {"tie_word_embeddings": True, "head_dim": 32},
}


def hf_config(kind: Kind, **overrides: Any) -> Any:
    """The transformers config object for a variant (``overrides`` win)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind]
    kwargs = {**COMMON, **VARIANTS[kind], **overrides}
    kwargs.pop("max_shard_size", None)
    return cls(**kwargs)


def build_checkpoint(kind: Kind, path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny seeded random ``kind`` model (fp32) and the byte tokenizer into ``path``.

    ``overrides`` go into the transformers config (e.g. ``rope_parameters``,
    ``tie_word_embeddings``); ``max_shard_size="40KB"`` saves shards with an index file.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    max_shard_size = overrides.pop("max_shard_size", VARIANTS[kind].get("max_shard_size"))
    config = hf_config(kind, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    write_byte_tokenizer(path, model_max_length=config.max_position_embeddings)
    return path


def load_hf(path: str | Path) -> Any:
    """The transformers reference model for a checkpoint directory (fp32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: str | Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """The reference: transformers ``generate``, greedy, one prompt at a time, EOS ignored."""
    import torch

    model = load_hf(path)
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(gen[0, len(p) :].tolist())
    return out
