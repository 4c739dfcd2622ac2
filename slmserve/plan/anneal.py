"""Simulated annealing over integer vectors ``0 <= n[t] <= upper[t]`` (replica counts per type).

Standard SA in the spirit of Alfares et al., "IaaS Procurement by Simulated Annealing" (2022):

* **Moves**: ``+1`` or ``-1`` replica of one type; a **transfer** between two types; with small
  probability a **jump** of one type to a random other count (to leave wide basins). A transfer
  moves one replica from type ``i`` to type ``j``, or, when per-type ``sizes`` (capacities) are
  given, half of the time moves *capacity*: one replica of ``i`` becomes ``ceil(μi/μj)``
  replicas of ``j`` (a big replica replaced by enough small ones), or ``floor(μj/μi)`` replicas
  of ``i`` become one of ``j`` (small ones replaced by a big one). Without it, swapping a big
  replica for small ones must pass through a state short of capacity, which a cold annealer
  never accepts. Only moves that stay within bounds are drawn (counts are clipped to the caps).
* **Acceptance** (Metropolis): a move that lowers the objective by ``-Δ`` is always taken, one
  that raises it by ``Δ > 0`` with probability ``exp(-Δ / T)``.
* **Initial temperature** from sampled uphill moves (Johnson et al., 1989): a random walk of
  ``t0_samples`` moves from the start records the positive ``Δ``; ``T0 = -mean(Δ⁺) / ln(χ0)``
  accepts an average uphill move with probability ``χ0`` (default 0.8).
* **Geometric cooling** ``T ← α T`` with ``α`` chosen so the last iteration runs at
  ``final_temperature`` (the caller sets it at the objective's resolution, e.g. 1% of the
  cheapest replica's price, where an uphill move is practically never taken).
* **Restarts**: the first run starts at ``start`` (a warm start), the others at random states;
  the best state ever evaluated (over all restarts) is returned. Seeded: same inputs, same
  answer.

The objective must be a pure function of the state: values are memoised, so revisiting a state
costs nothing (the simulator behind the planner's objective is the expensive part).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

State = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AnnealParams:
    iterations: int = 2000
    """Moves per restart."""
    restarts: int = 4
    initial_acceptance: float = 0.8
    """χ0: the probability of accepting an average uphill move at ``T0``."""
    final_temperature: float | None = None
    """Temperature of the last move; ``None``: ``T0 * 1e-4``."""
    jump_probability: float = 0.05
    transfer_probability: float = 0.4
    t0_samples: int = 60

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1 or self.t0_samples < 1:
            raise ValueError("iterations, restarts and t0_samples must be >= 1")
        if not 0.0 < self.initial_acceptance < 1.0:
            raise ValueError("initial_acceptance must be in (0, 1)")
        if self.final_temperature is not None and not self.final_temperature > 0:
            raise ValueError("final_temperature must be > 0")


@dataclass(frozen=True, slots=True)
class AnnealResult:
    best: State
    value: float
    t0: float
    alpha: float
    evaluations: int
    """Distinct states evaluated."""
    accepted: int
    uphill_accepted: int
    restart_values: list[float]
    """Best value found by each restart."""


def anneal(
    objective: Callable[[State], float],
    upper: Sequence[int],
    *,
    start: Sequence[int] | None = None,
    sizes: Sequence[float] | None = None,
    seed: int = 0,
    params: AnnealParams | None = None,
) -> AnnealResult:
    """Minimise ``objective`` over the box ``[0, upper]``; see the module docstring.

    ``sizes``: capacity of one unit of each type, for capacity-preserving transfers.
    """
    params = params or AnnealParams()
    hi = np.asarray(upper, np.int64)
    if hi.ndim != 1 or len(hi) == 0 or (hi < 0).any():
        raise ValueError("upper must be a non-empty vector of counts >= 0")
    mu = None if sizes is None else np.asarray(sizes, float)
    if mu is not None and (mu.shape != hi.shape or not (mu > 0).all()):
        raise ValueError("sizes must be one positive number per type")
    rng = np.random.default_rng(seed)
    memo: dict[State, float] = {}

    def f(state: State) -> float:
        value = memo.get(state)
        if value is None:
            value = memo[state] = float(objective(state))
        return value

    first: State = tuple(int(x) for x in start) if start is not None else _random_state(rng, hi)
    if len(first) != len(hi) or any(not 0 <= x <= u for x, u in zip(first, hi)):
        raise ValueError(f"start {first} is outside the bounds [0, {hi.tolist()}]")
    best, best_value = first, f(first)
    if int(hi.sum()) == 0:  # a single state
        return AnnealResult(best, best_value, 0.0, 1.0, len(memo), 0, 0, [best_value])

    t0 = _initial_temperature(f, first, hi, mu, rng, params)
    t_end = params.final_temperature or t0 * 1e-4
    t_end = min(t_end, t0)
    alpha = (t_end / t0) ** (1.0 / max(1, params.iterations - 1))
    accepted = uphill = 0
    restart_values = []
    for r in range(params.restarts):
        state = first if r == 0 else _random_state(rng, hi)
        value, temp = f(state), t0
        run_best = value
        if value < best_value:
            best, best_value = state, value
        for _ in range(params.iterations):
            cand = _neighbour(state, hi, mu, rng, params)
            delta = f(cand) - value
            if delta <= 0 or rng.random() < math.exp(-delta / temp):
                accepted += 1
                uphill += delta > 0
                state, value = cand, value + delta
                run_best = min(run_best, value)
                if value < best_value:
                    best, best_value = state, value
            temp *= alpha
        restart_values.append(run_best)
    return AnnealResult(best, best_value, t0, alpha, len(memo), accepted, uphill, restart_values)


def _initial_temperature(
    f: Callable[[State], float],
    start: State,
    hi: np.ndarray,
    mu: np.ndarray | None,
    rng: np.random.Generator,
    params: AnnealParams,
) -> float:
    """``-mean(Δ⁺) / ln χ0`` over the uphill moves of a random walk from ``start``."""
    state, value, ups = start, f(start), []
    for _ in range(params.t0_samples):
        cand = _neighbour(state, hi, mu, rng, params)
        delta = f(cand) - value
        if delta > 0:
            ups.append(delta)
        state, value = cand, value + delta
    if not ups:  # a flat or all-downhill walk: any positive temperature will do
        return 1.0
    return -float(np.mean(ups)) / math.log(params.initial_acceptance)


def _random_state(rng: np.random.Generator, hi: np.ndarray) -> State:
    return tuple(int(x) for x in rng.integers(0, hi + 1))


def _neighbour(
    state: State,
    hi: np.ndarray,
    mu: np.ndarray | None,
    rng: np.random.Generator,
    params: AnnealParams,
) -> State:
    """One random in-bounds move from ``state`` (the box has more than one point)."""
    n = np.asarray(state, np.int64)
    movable = np.flatnonzero(hi > 0)
    u = rng.random()
    if u < params.jump_probability:
        t = int(rng.choice(movable))
        value = int(rng.integers(0, hi[t]))  # uniform over the other hi[t] counts
        n[t] = value if value < n[t] else value + 1
        return tuple(int(x) for x in n)
    if u < params.jump_probability + params.transfer_probability:
        donors = np.flatnonzero(n > 0)
        takers = np.flatnonzero(n < hi)
        pairs = [(i, j) for i in donors for j in takers if i != j]
        if pairs:
            i, j = pairs[int(rng.integers(len(pairs)))]
            give = take = 1
            if mu is not None and rng.random() < 0.5:
                if mu[i] >= mu[j]:  # one big replica -> enough small ones
                    take = math.ceil(mu[i] / mu[j] - 1e-9)
                else:  # small replicas -> one big one
                    give = min(int(n[i]), max(1, math.floor(mu[j] / mu[i] + 1e-9)))
            n[i] -= give
            n[j] = min(int(hi[j]), int(n[j]) + take)
            return tuple(int(x) for x in n)
    steps = [(t, +1) for t in np.flatnonzero(n < hi)] + [(t, -1) for t in np.flatnonzero(n > 0)]
    t, d = steps[int(rng.integers(len(steps)))]
    n[t] += d
    return tuple(int(x) for x in n)
