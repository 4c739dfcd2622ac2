"""Fit the simulator's :class:`CostModel` to measured step times.

Each engine step is one row: the cost model's regressors for the step's plan (computed exactly
as :meth:`CostModel.step_time` weighs them) and its measured seconds. The coefficients are the
non-negative least-squares solution (Lawson & Hanson's active-set algorithm): a negative
coefficient would make some work take negative time, which the simulator cannot use.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from slmserve.engine.core import StepPlan
from slmserve.sim.simulator import CostModel

FIELDS = (
    "step_overhead",
    "prefill_token",
    "prefill_attention",
    "decode_step",
    "decode_seq",
    "decode_context",
)
"""Cost-model coefficients, in the order of :func:`step_features`."""


class FitQuality(msgspec.Struct, kw_only=True):
    """How well the fitted model explains the steps it was fitted on."""

    steps: int
    r2: float
    """1 - residual / total sum of squares of step times."""
    median_abs_rel_error: float
    """Median over steps of ``|predicted - measured| / measured``."""
    total_rel_error: float
    """``(Σ predicted - Σ measured) / Σ measured``: what drives simulated throughput."""


def step_features(plan: StepPlan) -> list[float]:
    """``[1, Σ new, Σ attention area, decodes?, decoding requests, Σ decode context]``: the
    simulator's own regressors (:meth:`CostModel.features`), so a fit means what it simulates."""
    return CostModel.features(plan)


def nnls(a: np.ndarray, b: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """``argmin ||a x - b||`` subject to ``x >= 0`` (Lawson & Hanson, 1974).

    Columns are scaled to unit norm first so regressors of very different magnitude (one per
    step vs. attention areas of millions) do not upset the tolerance tests.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    m, n = a.shape
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    a = a / norms
    x = np.zeros(n)
    passive = np.zeros(n, bool)
    tol = 10 * np.finfo(float).eps * max(m, n) * max(1.0, float(np.abs(a).max(initial=0.0)))
    for _ in range(max_iter or 3 * n + 10):
        w = a.T @ (b - a @ x)
        free = ~passive & (w > tol)
        if not free.any():
            break
        passive[np.argmax(np.where(free, w, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            # Step back to the boundary and drop the variables that hit zero.
            shrink = passive & (z <= 0)
            alpha = np.min(x[shrink] / (x[shrink] - z[shrink]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x / norms


def fit_cost_model(
    features: Sequence[Sequence[float]], seconds: Sequence[float]
) -> tuple[CostModel, FitQuality]:
    """Non-negative least squares of step times on :func:`step_features` rows."""
    x, y = np.asarray(features, float), np.asarray(seconds, float)
    if x.ndim != 2 or x.shape[1] != len(FIELDS) or len(x) != len(y):
        raise ValueError(f"need rows of {len(FIELDS)} features and one time per row")
    if len(y) < len(FIELDS):
        raise ValueError(f"need at least {len(FIELDS)} timed steps to fit, got {len(y)}")
    coef = nnls(x, y)
    model = CostModel(**{k: float(v) for k, v in zip(FIELDS, coef)})
    pred = x @ coef
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else 1.0
    rel = np.abs(pred - y) / np.maximum(y, 1e-12)
    quality = FitQuality(
        steps=len(y),
        r2=r2,
        median_abs_rel_error=float(np.median(rel)),
        total_rel_error=float((pred.sum() - y.sum()) / y.sum()),
    )
    return model, quality
