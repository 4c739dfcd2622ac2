"""The native Llama / Qwen2 / Qwen3 decoder, in plain torch, over the KV pool.

The three families differ only in a few switches (:class:`DecoderConfig`): Qwen2 has q/k/v
biases, Qwen3 normalises each query/key head (RMSNorm over ``head_dim``) before rotary
embeddings, Llama may carry biases everywhere (``attention_bias``, ``mlp_bias``). Module and
parameter names mirror transformers' (``model.layers.0.self_attn.q_proj.weight`` ...) so a
checkpoint's state dict loads as is.

Layers may have their own MLP width and head counts (pruned models): see ``layer_shapes`` in
:func:`DecoderConfig.from_hf` and docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slmserve.cache.kv_pool import KVPool
from slmserve.interfaces import ForwardBatch
from slmserve.models import rope
from slmserve.models.attention import attend, plan_attention, resolve_backend, write_kv

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
"""Supported ``architectures`` entries -> ``model_type``."""

LAYER_SHAPE_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True, slots=True)
class LayerShape:
    """Widths of one decoder layer."""

    intermediate_size: int
    num_heads: int
    num_kv_heads: int


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    """Everything the decoder needs, parsed from a transformers ``config.json`` dict."""

    model_type: str
    vocab_size: int
    hidden_size: int
    head_dim: int
    layers: tuple[LayerShape, ...]
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: dict[str, Any]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> DecoderConfig:
        """Parse a config dict; raise ``ValueError`` for what the decoder cannot run."""
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES.values():
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: "
                f"{', '.join(sorted(set(ARCHITECTURES.values())))}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(
                f"unsupported hidden_act {act!r}; the native decoder runs SwiGLU (silu)"
            )
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        layers = _layer_shapes(cfg, int(cfg["intermediate_size"]), heads, kv_heads)
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            head_dim=head_dim,
            layers=layers,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=model_type == "llama" and bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            rope=rope.rope_parameters(cfg),
        )

    @property
    def kv_layout(self) -> list[tuple[int, int]]:
        return [(layer.num_kv_heads, self.head_dim) for layer in self.layers]


def _layer_shapes(
    cfg: dict[str, Any], intermediate: int, heads: int, kv_heads: int
) -> tuple[LayerShape, ...]:
    """Uniform widths, overridden per layer by the optional ``layer_shapes`` list.

    ``layer_shapes[i]`` is a dict with any of :data:`LAYER_SHAPE_KEYS`; a missing key keeps the
    uniform value from the top of the config.
    """
    num_layers = int(cfg["num_hidden_layers"])
    overrides = cfg.get("layer_shapes") or [{}] * num_layers
    if len(overrides) != num_layers:
        raise ValueError(
            f"layer_shapes has {len(overrides)} entries but num_hidden_layers is {num_layers}"
        )
    shapes = []
    for i, o in enumerate(overrides):
        unknown = set(o) - set(LAYER_SHAPE_KEYS)
        if unknown:
            raise ValueError(f"layer_shapes[{i}]: unknown keys {sorted(unknown)}")
        shape = LayerShape(
            int(o.get("intermediate_size", intermediate)),
            int(o.get("num_attention_heads", heads)),
            int(o.get("num_key_value_heads", kv_heads)),
        )
        if min(shape.intermediate_size, shape.num_heads, shape.num_kv_heads) < 1:
            raise ValueError(f"layer_shapes[{i}]: every width must be >= 1, got {o}")
        if shape.num_heads % shape.num_kv_heads:
            raise ValueError(
                f"layer_shapes[{i}]: num_attention_heads ({shape.num_heads}) is not a multiple "
                f"of num_key_value_heads ({shape.num_kv_heads})"
            )
        shapes.append(shape)
    return tuple(shapes)


@dataclass(frozen=True, slots=True)
class MergedLinear:
    """Several linear layers over the same input as one matrix (rows stacked)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: list[int]


def _merge(linears: list[nn.Linear]) -> MergedLinear | None:
    """Stack the weights (and biases) and make each layer's parameters views into the stack;
    ``None`` (nothing changed) when only some of the layers have a bias."""
    biases = [lin.bias for lin in linears if lin.bias is not None]
    if biases and len(biases) != len(linears):
        return None
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat(biases) if biases else None
    sizes = [lin.out_features for lin in linears]
    start = 0
    for lin, size in zip(linears, sizes):
        lin.weight = nn.Parameter(weight[start : start + size], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + size], requires_grad=False)
        start += size
    return MergedLinear(weight, bias, sizes)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled after casting back (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, shape: LayerShape) -> None:
        super().__init__()
        d, hid = cfg.head_dim, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, d
        self.q_proj = nn.Linear(hid, shape.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(hid, shape.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(hid, shape.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(shape.num_heads * d, hid, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = d**-0.5
        self.merged: MergedLinear | None = None  # set by Decoder.merge_projections


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.merged: MergedLinear | None = None  # set by Decoder.merge_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig, shape: LayerShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, shape)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, shape.intermediate_size, cfg.mlp_bias)


class Body(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, shape) for shape in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Decoder(nn.Module):
    """Llama/Qwen2/Qwen3 decoder whose attention reads and writes the KV pool.

    Built with parameters on the ``meta`` device (no wasted random init); the loader fills them
    with ``load_state_dict(..., assign=True)``. With tied embeddings there is no ``lm_head``:
    logits use ``model.embed_tokens.weight``.
    """

    def __init__(
        self, cfg: DecoderConfig, device: torch.device | str = "cpu", attention: str = "auto"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = resolve_backend(attention, torch.device(device))
        # The Triton path also fuses the element-wise ops (slmserve.kernels.fused).
        self.fused = self.attention == "triton"
        with torch.device("meta"):
            self.model = Body(cfg)
            if not cfg.tie_word_embeddings:
                self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, self.rope_scale = rope.inv_freq_and_scale(
            cfg.rope, cfg.head_dim, cfg.max_position_embeddings
        )
        # A plain attribute, not a buffer: it must stay float32 when the weights are bf16.
        self.inv_freq = inv_freq.to(device)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:  # type: ignore[override]
        """Hidden states ``[L, hidden]`` (after the final norm) at ``batch.logit_indices``."""
        plan = plan_attention(batch, self.attention)
        h = self.model.embed_tokens(batch.input_ids)
        cos, sin = rope.cos_sin(batch.positions, self.inv_freq, self.rope_scale, h.dtype)
        num_tokens = h.shape[0]
        last = len(self.model.layers) - 1
        delta = None  # the last sublayer's output, not yet added to the residual stream ``h``
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            x, h = self._add_norm(delta, h, layer.input_layernorm)
            q, k, v = self._qkv(attn, x)
            q = q.view(num_tokens, attn.num_heads, attn.head_dim)
            k = k.view(num_tokens, attn.num_kv_heads, attn.head_dim)
            v = v.view(num_tokens, attn.num_kv_heads, attn.head_dim)
            q = self._norm_rope(q, attn.q_norm if attn.qk_norm else None, cos, sin)
            k = self._norm_rope(k, attn.k_norm if attn.qk_norm else None, cos, sin)
            write_kv(kv.k[i], kv.v[i], k, v, plan)
            o = attend(q, kv.k[i], kv.v[i], plan, attn.scale)
            delta = attn.o_proj(o.reshape(num_tokens, -1))
            if i == last:
                # Only the requested rows go on: the last MLP and the final norm are per token.
                delta, h = delta[batch.logit_indices], h[batch.logit_indices]
            x, h = self._add_norm(delta, h, layer.post_attention_layernorm)
            delta = self._mlp(layer.mlp, x)
        return self._add_norm(delta, h, self.model.norm)[0]

    def _add_norm(
        self, delta: torch.Tensor | None, h: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h += delta`` (when given), then ``norm(h)``: returns ``(normed, h)``."""
        if self.fused:
            from slmserve.kernels.fused import add_rms_norm

            if delta is None:
                return add_rms_norm(h, norm.weight, norm.eps)
            return add_rms_norm(delta, norm.weight, norm.eps, residual=h)
        if delta is not None:
            h = h + delta
        return norm(h), h

    def _norm_rope(
        self, x: torch.Tensor, norm: RMSNorm | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Qwen3's per-head q/k norm (when ``norm`` is given), then the rotary embedding."""
        if self.fused:
            from slmserve.kernels.fused import norm_rope

            weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
            return norm_rope(x, weight, eps, cos, sin)
        if norm is not None:
            x = norm(x)
        return rope.apply_rotary(x, cos, sin)

    def _qkv(
        self, attn: Attention, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        merged = attn.merged
        if merged is not None:  # one matmul, three column views
            q, k, v = F.linear(x, merged.weight, merged.bias).split(merged.sizes, dim=-1)
            return q, k, v
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    def _mlp(self, mlp: MLP, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from slmserve.kernels.fused import silu_mul

            merged = mlp.merged
            if merged is not None:
                gate, up = F.linear(x, merged.weight, merged.bias).split(merged.sizes, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            return mlp.down_proj(silu_mul(gate, up))
        return mlp(x)

    def merge_projections(self) -> None:
        """Store q/k/v and gate/up weights as one matrix each, the per-projection parameters
        becoming views into it (no extra memory; ``state_dict`` unchanged), so a layer runs two
        large matmuls instead of five: fewer launches and better GEMM shapes on a GPU. Done by
        the loader on the Triton path only: on the CPU a merged matmul may round differently
        from transformers' separate ones, and the CPU path is checked token for token."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.merged = _merge([attn.q_proj, attn.k_proj, attn.v_proj])
            mlp.merged = _merge([mlp.gate_proj, mlp.up_proj])

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits ``[L, V]``, or ``[L, len(vocab_ids)]`` from only those LM-head rows.

        The full projection runs in the model dtype; the ``vocab_ids`` subset (scoring reads two
        rows) runs in float32, which costs nothing and keeps close label scores apart in bf16.
        """
        weight = self.lm_head_weight
        if vocab_ids is None:
            return F.linear(hidden, weight).float()
        return F.linear(hidden.float(), weight.index_select(0, vocab_ids).float())
