"""Layer-wise, sequential structured pruning of a transformers Llama / Qwen2 / Qwen3 model.

Two matrices per decoder layer are optimised, everything else is only sliced later
(:mod:`slmserve.prune.pack`):

* ``self_attn.o_proj``, grouped by **KV group**: one group is the ``r·head_dim`` input columns
  of the ``r = heads / kv_heads`` query heads that share a KV head (a KV head can only go
  together with all of its query heads);
* ``mlp.down_proj``, one group per intermediate neuron (one input column).

Sequential and "true sequential": the inputs of layer ``l`` are produced by the already pruned
layers ``< l``; within a layer the attention is pruned first and the MLP statistics are then
collected behind the pruned attention. The target is the dense weights applied to these pruned
inputs (``G = H_pruned · B̂``), not the dense model's own activations.

The model is changed in place into the **masked** model: refitted ``o_proj`` / ``down_proj``
with the columns of dropped groups at zero. It computes exactly what the packed model computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slmserve.prune import METHODS, baselines
from slmserve.prune.calibration import GramCollector, Windows
from slmserve.prune.gram import DEFAULT_DAMPING, LayerProblem, make_problem, relative_error
from slmserve.prune.osscar import Solution, osscar


@dataclass(frozen=True, slots=True)
class PruneOptions:
    method: str = "osscar"
    damping: float = DEFAULT_DAMPING
    update_iter: int = 1
    """Groups removed per greedy step (1 is exact greedy; larger is faster)."""
    local_search: bool = False
    local_iter: int = 30
    swap_size: int = 10
    """First swap size of the local search (halved after a failed swap)."""
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.local_search and self.method != "osscar":
            raise ValueError("local search applies to the osscar method only")
        for name in ("update_iter", "local_iter", "swap_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class LayerBudget:
    """How many MLP neurons and KV groups one layer keeps."""

    mlp_keep: int
    kv_keep: int


@dataclass(slots=True)
class LayerResult:
    """What was kept in one layer, its calibration errors, and the dense weights it started from.

    ``*_error`` is the relative reconstruction error of the layer output on the calibration
    tokens (:func:`slmserve.prune.gram.relative_error`); 0 when nothing was pruned.
    """

    mlp_kept: torch.Tensor
    kv_kept: torch.Tensor
    mlp_total: int
    kv_total: int
    mlp_error: float
    attn_error: float
    dense_down: torch.Tensor
    dense_o: torch.Tensor


@dataclass(slots=True)
class PruneResult:
    layers: list[LayerResult] = field(default_factory=list)
    calibration_tokens: int = 0


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def attention_shape(layer: nn.Module) -> tuple[int, int, int]:
    """``(query heads, kv heads, head_dim)`` of a layer, read from its projections."""
    attn = layer.self_attn
    hd = int(attn.head_dim)
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd, hd


def _fractions(value: float | Sequence[float], n: int, what: str) -> list[float]:
    values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what}: {len(values)} values given for {n} layers")
    for v in values:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"{what} must be in (0, 1], got {v:g}")
    return values


def plan_budgets(
    model: nn.Module, mlp_keep: float | Sequence[float], kv_keep: float | Sequence[float]
) -> list[LayerBudget]:
    """Integer budgets per layer from keep fractions (one value, or one per layer).

    MLP neurons round to the nearest count (at least 1); KV groups must come out whole, since a
    fraction of a KV head cannot be kept.
    """
    layers = decoder_layers(model)
    mlp = _fractions(mlp_keep, len(layers), "MLP keep fraction")
    kv = _fractions(kv_keep, len(layers), "KV-group keep fraction")
    budgets = []
    for i, (layer, fm, fk) in enumerate(zip(layers, mlp, kv)):
        neurons = layer.mlp.down_proj.in_features
        _, n_kv, _ = attention_shape(layer)
        groups = fk * n_kv
        if abs(groups - round(groups)) > 1e-6:
            raise ValueError(
                f"KV-group keep fraction {fk:g} of {n_kv} KV heads in layer {i} is "
                f"{groups:g} groups; it must give a whole number (e.g. "
                f"{', '.join(f'{j / n_kv:g}' for j in range(1, n_kv + 1))})"
            )
        budgets.append(LayerBudget(max(1, round(fm * neurons)), round(groups)))
    return budgets


def solve(
    method: str, p: LayerProblem, keep: int, gram: torch.Tensor, options: PruneOptions
) -> Solution:
    """One layer's solution with the chosen method."""
    if method == "osscar":
        return osscar(
            p,
            keep,
            update_iter=options.update_iter,
            local=options.local_search,
            swap_size=options.swap_size,
            local_iter=options.local_iter,
        )
    if method == "wanda":
        return baselines.wanda(p, keep, gram.diagonal())
    return baselines.magnitude(p, keep, refit_weights=method == "magnitude-refit")


States = list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]
"""Per calibration batch: the layer's input hidden states, its call keywords, the token mask."""


class _Stop(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded."""


def capture_inputs(model: nn.Module, windows: Windows, batch_size: int) -> States:
    """Layer 0's hidden states and call keywords (masks, rotary tables) for every batch.

    The keywords are replayed as they are for every later layer: all layers of these families
    receive the same ones.
    """
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    batches = windows.batches(batch_size)
    try:
        for b in batches:
            with contextlib.suppress(_Stop):
                ids, mask = b.ids.to(device), b.mask.long().to(device)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return [(h, kw, b.mask.to(device)) for (h, kw), b in zip(captured, batches)]


def _layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _statistics(
    layer: nn.Module, module: nn.Linear, states: States, keep_io: bool
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One pass of ``layer`` over all batches: ``module``'s input Gram matrix and, if
    ``keep_io``, ``module``'s inputs and the layer's outputs for every batch (else empty)."""
    collector = GramCollector(module)
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    handle = None
    if keep_io:
        handle = module.register_forward_hook(lambda _m, args, _o: inputs.append(args[0]))
    try:
        for hidden, kwargs, mask in states:
            collector.mask = mask
            out = _layer_forward(layer, hidden, kwargs)
            if keep_io:
                outputs.append(out)
    finally:
        if handle is not None:
            handle.remove()
        gram = collector.close()
    return gram, inputs, outputs


def _prune_matrix(
    layer: nn.Module,
    module: nn.Linear,
    states: States,
    keep: int,
    group_size: int,
    options: PruneOptions,
    next_states: bool = False,
) -> tuple[torch.Tensor, float, States | None]:
    """Collect statistics, solve, write the masked refitted weight.

    Returns the kept groups, the calibration error and, if ``next_states``, the layer's
    outputs with the new weight. When ``module`` is the last matrix of the layer (``down_proj``)
    these follow from the same pass: the output is linear in its weight, so the pruned output
    is the recorded one plus ``X (W_new − W)ᵀ`` — one layer forward per batch saved.
    """
    gram, inputs, outputs = _statistics(layer, module, states, keep_io=next_states)
    dense = module.weight.detach().clone()
    p = make_problem(gram, dense, group_size, options.damping)
    sol = solve(options.method, p, keep, gram, options)
    module.weight.data.copy_(sol.weight.t().to(module.weight.dtype))
    kept = sol.keep.nonzero().squeeze(1).cpu()
    following = None
    if next_states:
        delta = (module.weight - dense).t()
        following = [
            (out + x @ delta, kw, m) for out, x, (_, kw, m) in zip(outputs, inputs, states)
        ]
    return kept, relative_error(gram, dense, module.weight), following


@torch.no_grad()
def prune_model(
    model: nn.Module,
    windows: Windows,
    budgets: list[LayerBudget],
    options: PruneOptions,
    progress: Callable[[int, LayerResult], None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place (masked) layer by layer; ``progress(i, result)`` after each."""
    layers = decoder_layers(model)
    if len(budgets) != len(layers):
        raise ValueError(f"{len(budgets)} budgets for {len(layers)} layers")
    model.eval()
    states = capture_inputs(model, windows, options.batch_size)
    result = PruneResult(calibration_tokens=windows.num_tokens)
    for i, (layer, budget) in enumerate(zip(layers, budgets)):
        n_q, n_kv, hd = attention_shape(layer)
        o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj
        dense_o, dense_down = o_proj.weight.detach().clone(), down.weight.detach().clone()
        last = i + 1 == len(layers)
        kv_kept, attn_err = torch.arange(n_kv), 0.0
        if budget.kv_keep < n_kv:
            group = (n_q // n_kv) * hd
            kv_kept, attn_err, _ = _prune_matrix(
                layer, o_proj, states, budget.kv_keep, group, options
            )
        mlp_kept, mlp_err, following = torch.arange(down.in_features), 0.0, None
        if budget.mlp_keep < down.in_features:
            mlp_kept, mlp_err, following = _prune_matrix(
                layer, down, states, budget.mlp_keep, 1, options, next_states=not last
            )
        if not last:
            states = following or [(_layer_forward(layer, h, kw), kw, m) for h, kw, m in states]
        res = LayerResult(
            mlp_kept, kv_kept, down.in_features, n_kv, mlp_err, attn_err, dense_down, dense_o
        )
        result.layers.append(res)
        if progress is not None:
            progress(i, res)
    return result
