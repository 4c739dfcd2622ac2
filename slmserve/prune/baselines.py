"""The baselines OSSCAR is measured against, on the same :class:`LayerProblem`.

* ``magnitude``: keep the groups with the largest weight norm ``‖W_:,g‖_F``; no refit (the
  kept weights stay as they were). The reference code's ``MP``.
* ``magnitude-refit``: the same selection, then the exact least-squares refit on the kept
  groups (the reference code's ``MP_plus``). Against ``magnitude`` it shows what the refit buys;
  against OSSCAR, what the selection buys.
* ``wanda``: a structured Wanda-style score ``Σ_{j∈g} ‖W_:,j‖₂ · ‖X_:,j‖₂`` (weight norm times
  input activation norm, ``‖X_:,j‖₂ = √H_jj`` from the undamped Gram), then the exact refit.
"""

from __future__ import annotations

import torch

from slmserve.prune.gram import LayerProblem, objective, refit
from slmserve.prune.osscar import Solution


def magnitude_scores(p: LayerProblem) -> torch.Tensor:
    """Frobenius norm of each group's weights."""
    return p.dense.pow(2).sum(1).reshape(p.num_groups, -1).sum(1).sqrt()


def wanda_scores(p: LayerProblem, gram_diag: torch.Tensor) -> torch.Tensor:
    """Per group, the sum over its inputs of weight-column norm times activation norm."""
    col = p.dense.pow(2).sum(1).sqrt() * gram_diag.to(p.dense).clamp_min(0).sqrt()
    return col.reshape(p.num_groups, -1).sum(1)


def top_groups(scores: torch.Tensor, keep_count: int) -> torch.Tensor:
    """Boolean mask of the ``keep_count`` highest-scoring groups (ties: lowest index)."""
    if not 1 <= keep_count <= scores.numel():
        raise ValueError(f"keep_count must be in [1, {scores.numel()}], got {keep_count}")
    order = torch.argsort(-scores, stable=True)[:keep_count]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order] = True
    return keep


def magnitude(p: LayerProblem, keep_count: int, *, refit_weights: bool) -> Solution:
    keep = top_groups(magnitude_scores(p), keep_count)
    b = refit(p, keep) if refit_weights else p.dense * p.rows(keep)[:, None]
    return Solution(keep, b, objective(p, b))


def wanda(p: LayerProblem, keep_count: int, gram_diag: torch.Tensor) -> Solution:
    keep = top_groups(wanda_scores(p, gram_diag), keep_count)
    b = refit(p, keep)
    return Solution(keep, b, objective(p, b))
