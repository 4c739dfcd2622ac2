"""The planner's objective: hourly cost + capacity-shortfall penalty + latency (SLO) penalty.

For replica counts ``n`` (per type), prices ``c``, per-replica capacities ``μ`` (items/s),
demand ``λ`` and headroom ``h`` (capacity required: ``λ(1+h)``):

* ``cost = Σ n·c`` (per hour), plus ``change_cost · Σ |n - previous|`` when planning a period
  after another one (replicas started or stopped);
* ``shortfall = max(0, λ(1+h) - Σ n·μ)``;
* ``excess`` = how far the predicted P99 is over the SLO, ``min(1, P99/SLO - 1)`` when positive
  (the P99 comes from a latency model and is only computed for a fleet with enough capacity);
* ``J = cost + [infeasible]·F + M·shortfall + B·excess`` where

  - ``F = 1.01·(max c + change_cost)`` and ``M = 2·max((c + change_cost)/μ)``: an **exact
    penalty** for capacity — from any fleet short by ``s``, adding replicas until it is covered
    costs at most ``max(c/μ)·s + max c`` (every added replica but the last fills ``μ`` of the
    gap), which is less than its penalty. So, without an SLO, the minimum of ``J`` is the
    cheapest fleet that covers the demand, and the penalty is a gentle slope the annealer can
    cross rather than a cliff;
  - ``B`` = the price of every replica in the box (+ change costs): a P99 just over the SLO is
    already expensive, twice the SLO costs more than any fleet.

The planner reports the cheapest *feasible* fleet it evaluated (capacity covered and P99 within
the SLO), which is the minimum of ``J`` whenever a feasible fleet exists among those visited.

A pure function of ``n`` (for a deterministic latency model), as the annealer requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LatencyModel = Callable[[Sequence[int], float], float]
"""``(counts, demand items/s) -> fleet P99 seconds``."""


@dataclass(frozen=True, slots=True)
class Problem:
    prices: np.ndarray
    capacity: np.ndarray
    """Items/s one replica of each type serves (at saturation)."""
    upper: np.ndarray
    """Availability caps (0 for a type that cannot be used)."""
    demand: float
    headroom: float = 0.0
    slo: float | None = None
    """P99 latency target in seconds (``None``: capacity only)."""
    previous: tuple[int, ...] | None = None
    change_cost: float = 0.0

    @property
    def required(self) -> float:
        return self.demand * (1.0 + self.headroom)

    @property
    def _change(self) -> float:
        return self.change_cost if self.previous is not None else 0.0

    @property
    def fixed_penalty(self) -> float:
        """``F``: more than one replica (and its change cost) of any type."""
        return 1.01 * (float(self.prices.max(initial=0.0)) + self._change) + 1e-9

    @property
    def shortfall_penalty(self) -> float:
        """``M``: per item/s of shortfall, twice the dearest capacity in the box."""
        usable = (self.upper > 0) & (self.capacity > 0)
        if not usable.any():
            return 1.0
        return 2.0 * float(((self.prices[usable] + self._change) / self.capacity[usable]).max())

    @property
    def latency_penalty(self) -> float:
        """``B``: the price of every replica in the box, with change costs."""
        top = float(self.prices @ self.upper)
        if self.previous is not None:
            top += self.change_cost * float(np.maximum(self.upper, self.previous).sum())
        return top + 1.0


@dataclass(frozen=True, slots=True)
class Evaluation:
    counts: tuple[int, ...]
    cost: float
    """Hourly price of the fleet."""
    change: float
    """Change cost against the previous plan."""
    capacity: float
    shortfall: float
    p99: float | None
    """Predicted P99 (``None``: not computed, the fleet is short of capacity)."""
    excess: float
    """P99 over the SLO, relative (0 when within it or not computed)."""
    value: float

    @property
    def feasible(self) -> bool:
        """Capacity covers the demand (with headroom) and the P99 is within the SLO."""
        return self.shortfall == 0.0 and self.excess == 0.0


def evaluate(problem: Problem, counts: Sequence[int], latency: LatencyModel | None) -> Evaluation:
    """The objective and its parts for ``counts``."""
    n = np.asarray(counts, np.int64)
    cost = float(problem.prices @ n)
    change = 0.0
    if problem.previous is not None:
        change = problem.change_cost * float(np.abs(n - np.asarray(problem.previous)).sum())
    capacity = float(problem.capacity @ n)
    required = problem.required
    shortfall = max(0.0, required - capacity)
    p99: float | None = None
    excess = 0.0
    if shortfall == 0 and problem.slo is not None and latency is not None and problem.demand > 0:
        p99 = float(latency(tuple(int(x) for x in n), problem.demand))
        if p99 > problem.slo:
            excess = 1.0 if math.isinf(p99) else min(1.0, p99 / problem.slo - 1.0)
    value = cost + change + problem.shortfall_penalty * shortfall
    value += problem.latency_penalty * excess
    if shortfall > 0 or excess > 0:
        value += problem.fixed_penalty
    return Evaluation(
        tuple(int(x) for x in n), cost, change, capacity, shortfall, p99, excess, value
    )
