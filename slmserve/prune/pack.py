"""Packing: turn the masked model into a genuinely smaller one and save it.

Per layer, the kept MLP neurons keep their ``gate_proj``/``up_proj`` rows (and biases) and
their refitted ``down_proj`` columns; the kept KV groups keep their ``k_proj``/``v_proj`` rows,
the ``q_proj`` rows of their query heads and the matching refitted ``o_proj`` columns. Qwen3's
``q_norm``/``k_norm`` act on ``head_dim`` and are shared by all heads, so they are untouched.

The config gets ``head_dim`` explicitly (Llama would otherwise derive it from
``hidden_size / num_attention_heads``, wrong once heads are gone). Equal sizes in every layer
go into the ordinary ``intermediate_size`` / head-count fields, so plain transformers loads the
result; unequal sizes go into ``layer_shapes`` (one entry per layer, see docs/models.md), which
only slmserve reads, and the top-level fields hold the largest layer so that transformers
refuses the checkpoint instead of misreading it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmserve.prune.pipeline import PruneResult, attention_shape, decoder_layers

WEIGHT_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _slice_linear(
    lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w[rows.to(w.device)]
        b = b[rows.to(w.device)] if b is not None else None
    if cols is not None:
        w = w[:, cols.to(w.device)]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.requires_grad_(lin.weight.requires_grad)
    return new


def group_rows(groups: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole groups of ``size`` consecutive rows."""
    return (groups[:, None] * size + torch.arange(size)).reshape(-1)


def pack_layer(layer: nn.Module, mlp_kept: torch.Tensor, kv_kept: torch.Tensor) -> None:
    """Slice one decoder layer in place down to the kept neurons and KV groups."""
    mlp = layer.mlp
    mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=mlp_kept)
    mlp.up_proj = _slice_linear(mlp.up_proj, rows=mlp_kept)
    mlp.down_proj = _slice_linear(mlp.down_proj, cols=mlp_kept)
    attn = layer.self_attn
    n_q, n_kv, hd = attention_shape(layer)
    q_rows = group_rows(kv_kept, (n_q // n_kv) * hd)
    kv_rows = group_rows(kv_kept, hd)
    attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Each layer's widths, read from its projections."""
    shapes = []
    for layer in decoder_layers(model):
        n_q, n_kv, _ = attention_shape(layer)
        shapes.append(
            {
                "intermediate_size": layer.mlp.down_proj.in_features,
                "num_attention_heads": n_q,
                "num_key_value_heads": n_kv,
            }
        )
    return shapes


def pack_model(model: nn.Module, result: PruneResult, metadata: dict[str, Any]) -> bool:
    """Slice the masked ``model`` in place and rewrite its config; True when layers are uniform.

    ``metadata`` is recorded under ``config.slmserve["pruning"]``.
    """
    layers = decoder_layers(model)
    if len(result.layers) != len(layers):
        raise ValueError(f"result has {len(result.layers)} layers, model {len(layers)}")
    head_dim = attention_shape(layers[0])[2]
    for layer, res in zip(layers, result.layers):
        pack_layer(layer, res.mlp_kept, res.kv_kept)
    shapes = layer_shapes(model)
    cfg = model.config
    uniform = all(s == shapes[0] for s in shapes)
    top = shapes[0] if uniform else {k: max(s[k] for s in shapes) for k in shapes[0]}
    for key, value in top.items():
        setattr(cfg, key, value)
    cfg.head_dim = head_dim
    if uniform:
        if hasattr(cfg, "layer_shapes"):
            del cfg.layer_shapes
    else:
        cfg.layer_shapes = shapes
    extra = dict(getattr(cfg, "slmserve", None) or {})
    extra["pruning"] = metadata
    cfg.slmserve = extra
    return uniform


def save_packed(model: nn.Module, out: str | Path, source: str | Path) -> Path:
    """``save_pretrained`` the packed model, then copy the tokenizer (and other) files over."""
    out, source = Path(out), Path(source)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    written = {f.name for f in out.iterdir()}
    for f in sorted(source.iterdir()):
        weights = f.suffix in (".safetensors", ".bin", ".pt") or f.name in WEIGHT_FILES
        if f.is_file() and not weights and f.name not in written:
            shutil.copy2(f, out / f.name)
    return out


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())
