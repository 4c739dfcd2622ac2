"""Exact answers to check the annealer against: brute force, dynamic programming, LP bound.

* :func:`brute_force` enumerates the whole box (small instances, any objective).
* :func:`min_cost_cover` solves the **linear-cost** case exactly — minimise ``Σ c·n`` subject to
  ``Σ μ·n >= D`` and ``0 <= n <= u`` with integer ``μ`` and ``D`` (a bounded min-cost covering
  knapsack) — by dynamic programming over covered capacity capped at ``D``: ``O(K · D · u)``.
* :func:`lp_bound` is the fractional relaxation of the same problem: fill the cheapest capacity
  first (``c/μ`` ascending) up to the caps. No integer fleet costs less.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

State = tuple[int, ...]


def brute_force(objective: Callable[[State], float], upper: Sequence[int]) -> tuple[State, float]:
    """The best state of the box ``[0, upper]`` (first in lexicographic order among ties)."""
    states = itertools.product(*(range(u + 1) for u in upper))
    best = next(states)
    best_value = objective(best)
    for state in states:
        value = objective(state)
        if value < best_value:
            best, best_value = state, value
    return best, best_value


def min_cost_cover(
    prices: Sequence[float], capacity: Sequence[int], upper: Sequence[int], required: int
) -> tuple[State, float] | None:
    """Cheapest counts covering ``required``; ``None`` if even every replica falls short.

    ``F_t[L]`` is the least cost of covering at least ``L`` with the first ``t`` types;
    ``F_{t+1}[L] = min_k F_t[max(L - k·μ_t, 0)] + k·c_t`` over ``k = 0..u_t``. The answer is
    ``F_K[D]``; the counts are read back from the tables.
    """
    if any(int(m) != m or m < 0 for m in capacity) or int(required) != required:
        raise ValueError("min_cost_cover needs integer capacities and requirement")
    d = max(0, int(required))
    levels = np.arange(d + 1)
    table = np.full(d + 1, np.inf)
    table[0] = 0.0
    tables = [table]
    for c, m, u in zip(prices, capacity, upper):
        options = [
            tables[-1][np.maximum(levels - k * int(m), 0)] + k * float(c) for k in range(int(u) + 1)
        ]
        tables.append(np.min(options, axis=0))
    best = float(tables[-1][d])
    if not math.isfinite(best):
        return None
    counts = [0] * len(prices)
    level = d
    for t in range(len(prices) - 1, -1, -1):
        m, c = int(capacity[t]), float(prices[t])
        for k in range(int(upper[t]) + 1):
            src = max(level - k * m, 0)
            if tables[t][src] + k * c <= tables[t + 1][level] * (1 + 1e-12) + 1e-12:
                counts[t], level = k, src
                break
    return tuple(counts), best


def lp_bound(
    prices: Sequence[float], capacity: Sequence[float], upper: Sequence[int], required: float
) -> float:
    """Fractional relaxation: cheapest ``c/μ`` first, up to the caps (``inf`` if infeasible)."""
    need = float(required)
    total = 0.0
    order = sorted((c / m, m, u) for c, m, u in zip(prices, capacity, upper) if m > 0 and u > 0)
    for per_unit, m, u in order:
        if need <= 0:
            break
        take = min(need, m * u)
        total += take * per_unit
        need -= take
    return total if need <= 1e-12 * max(1.0, float(required)) else math.inf
