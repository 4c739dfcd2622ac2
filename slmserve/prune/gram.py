"""One linear layer's structured-pruning problem in Gram form (OSSCAR §3.1).

A layer ``y = W x`` with ``W`` of shape ``(d_out, d_in)`` is handled through ``B = Wᵀ``
(rows = input channels). Pruning input groups of ``B`` to minimise ``½‖X B − X B̂‖²`` only ever
needs the Gram matrix ``H = XᵀX`` (``d_in × d_in``) and ``G = H B̂``: the calibration token
count never appears again once ``H`` is accumulated, which is what makes the method scale.

With damping ``H ← H + λ·mean(diag H)·I`` and ``G = H B̂`` (damped ``H``) the objective is
``f(B) = ½ tr((B − B̂)ᵀ H (B − B̂))``: the reconstruction error plus a small proximal term
that keeps the refit near the dense weights when a direction is poorly covered by the data.
Everything here is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_DAMPING = 0.01
"""Fraction of the mean Gram diagonal added to the diagonal (the OSSCAR/FMCHISEL default)."""


@dataclass(frozen=True, slots=True)
class LayerProblem:
    """``H`` (damped), ``B̂`` (dead inputs zeroed) and ``G = H B̂`` for one layer.

    Groups are contiguous runs of ``group_size`` input rows: group ``g`` owns rows
    ``[g·k, (g+1)·k)``.
    """

    hessian: torch.Tensor
    dense: torch.Tensor
    target: torch.Tensor
    group_size: int

    @property
    def num_groups(self) -> int:
        return self.dense.shape[0] // self.group_size

    def rows(self, groups: torch.Tensor) -> torch.Tensor:
        """Row mask ``[d_in]`` of a group mask ``[G]``."""
        return groups.repeat_interleave(self.group_size)


def make_problem(
    gram: torch.Tensor, weight: torch.Tensor, group_size: int, damping: float = DEFAULT_DAMPING
) -> LayerProblem:
    """Build the problem from ``XᵀX`` and an ``nn.Linear`` weight ``(d_out, d_in)``.

    Inputs that never fire (zero diagonal) carry no information about their weights; they are
    zeroed so that removing them costs nothing, as in the reference implementation.
    """
    d_in = weight.shape[1]
    if gram.shape != (d_in, d_in):
        raise ValueError(f"Gram matrix shape {tuple(gram.shape)} does not fit d_in={d_in}")
    if group_size < 1 or d_in % group_size:
        raise ValueError(f"group size {group_size} does not divide d_in={d_in}")
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    h = gram.to(torch.float64).clone()
    dense = weight.detach().to(torch.float64).t().clone()
    diag = h.diagonal()
    dense[diag <= 0] = 0.0
    scale = diag.mean().item()
    diag += damping * (scale if scale > 0 else 1.0)
    return LayerProblem(h, dense, h @ dense, group_size)


def objective(p: LayerProblem, b: torch.Tensor) -> float:
    """``f(B) = ½ tr((B − B̂)ᵀ H (B − B̂))`` (0 at the dense weights)."""
    d = b - p.dense
    return 0.5 * float((d * (p.hessian @ d)).sum())


def refit(p: LayerProblem, keep: torch.Tensor) -> torch.Tensor:
    """Exact minimiser of ``f`` with the rows of dropped groups fixed at zero.

    ``B_S = H_SS⁻¹ G_S`` by a Cholesky solve (``H_SS`` is positive definite after damping).
    """
    rows = p.rows(keep)
    b = torch.zeros_like(p.dense)
    if rows.any():
        chol = torch.linalg.cholesky(p.hessian[rows][:, rows])
        b[rows] = torch.cholesky_solve(p.target[rows], chol)
    return b


def support_inverse(p: LayerProblem, keep: torch.Tensor) -> torch.Tensor:
    """``H_SS⁻¹`` embedded in a zero ``d_in × d_in`` matrix (rows/columns of ``S`` only)."""
    rows = p.rows(keep)
    inv = torch.zeros_like(p.hessian)
    if rows.any():
        idx = rows.nonzero().squeeze(1)
        chol = torch.linalg.cholesky(p.hessian[idx][:, idx])
        inv[idx.unsqueeze(1), idx] = torch.cholesky_inverse(chol)
    return inv


def relative_error(gram: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """``tr((B̂ − B)ᵀ H (B̂ − B)) / tr(B̂ᵀ H B̂)`` with an undamped ``H`` (any token set).

    ``dense`` and ``pruned`` are ``nn.Linear`` weights ``(d_out, d_in)``: the squared error of
    the layer output relative to the squared dense output, on the tokens behind ``gram``.
    """
    h = gram.to(torch.float64)
    w = dense.detach().to(torch.float64).t()
    d = w - pruned.detach().to(torch.float64).t()
    num = float((d * (h @ d)).sum())
    den = float((w * (h @ w)).sum())
    return num / den if den > 0 else 0.0
