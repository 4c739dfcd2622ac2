"""Properties of the exact planners the annealer is checked against, on random instances."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from slmserve.plan.anneal import AnnealParams, anneal
from slmserve.plan.exact import brute_force, lp_bound, min_cost_cover
from slmserve.plan.objective import Problem, evaluate


@st.composite
def instances(draw: st.DrawFn, max_types: int = 3, max_cap: int = 5) -> dict:
    k = draw(st.integers(1, max_types))
    prices = draw(st.lists(st.integers(1, 40), min_size=k, max_size=k))
    capacity = draw(st.lists(st.integers(1, 30), min_size=k, max_size=k))
    upper = draw(st.lists(st.integers(0, max_cap), min_size=k, max_size=k))
    need = draw(st.integers(0, 150))
    return {"prices": [p / 4 for p in prices], "capacity": capacity, "upper": upper, "need": need}


def brute_cover(inst: dict, need: int) -> float:
    prices, capacity = np.array(inst["prices"]), np.array(inst["capacity"])

    def cost(state: tuple[int, ...]) -> float:
        return float(prices @ state) if capacity @ state >= need else math.inf

    return brute_force(cost, inst["upper"])[1]


@settings(max_examples=150, deadline=None)
@given(instances())
def test_dp_equals_brute_force(inst: dict) -> None:
    exact = min_cost_cover(inst["prices"], inst["capacity"], inst["upper"], inst["need"])
    best = brute_cover(inst, inst["need"])
    if exact is None:
        assert math.isinf(best)
        assert np.dot(inst["capacity"], inst["upper"]) < inst["need"]
    else:
        counts, cost = exact
        assert cost == best
        assert np.dot(inst["capacity"], counts) >= inst["need"]
        assert np.dot(inst["prices"], counts) == cost
        assert all(0 <= c <= u for c, u in zip(counts, inst["upper"]))


@settings(max_examples=150, deadline=None)
@given(instances(max_types=4, max_cap=8), st.integers(0, 60))
def test_more_demand_never_lowers_the_optimal_cost(inst: dict, extra: int) -> None:
    args = (inst["prices"], inst["capacity"], inst["upper"])
    low = min_cost_cover(*args, inst["need"])
    high = min_cost_cover(*args, inst["need"] + extra)
    if high is not None:
        assert low is not None and low[1] <= high[1]


@settings(max_examples=150, deadline=None)
@given(instances(max_types=4, max_cap=8), st.integers(0, 3))
def test_more_availability_never_raises_the_optimal_cost(inst: dict, more: int) -> None:
    base = min_cost_cover(inst["prices"], inst["capacity"], inst["upper"], inst["need"])
    wider = [u + more for u in inst["upper"]]
    grown = min_cost_cover(inst["prices"], inst["capacity"], wider, inst["need"])
    if base is not None:
        assert grown is not None and grown[1] <= base[1]


@settings(max_examples=150, deadline=None)
@given(instances(max_types=4, max_cap=8))
def test_lp_bound_is_below_the_integer_optimum(inst: dict) -> None:
    exact = min_cost_cover(inst["prices"], inst["capacity"], inst["upper"], inst["need"])
    bound = lp_bound(inst["prices"], inst["capacity"], inst["upper"], inst["need"])
    if exact is None:
        assert math.isinf(bound)
    else:
        assert bound <= exact[1] + 1e-9
        cheapest = min(p / m for p, m, u in zip(inst["prices"], inst["capacity"], inst["upper"])
                       if u > 0) if inst["need"] else 0.0  # fmt: skip
        assert bound >= inst["need"] * cheapest - 1e-9  # the uncapped bound λ·min(c/μ)


@settings(max_examples=40, deadline=None)
@given(instances(), st.integers(0, 2**16))
def test_annealing_without_an_slo_finds_the_dp_optimum(inst: dict, seed: int) -> None:
    """Small linear instances: the exact penalty makes J's minimum the cheapest cover."""
    exact = min_cost_cover(inst["prices"], inst["capacity"], inst["upper"], inst["need"])
    prob = Problem(
        prices=np.array(inst["prices"]),
        capacity=np.array(inst["capacity"], float),
        upper=np.array(inst["upper"]),
        demand=float(inst["need"]),
    )

    def f(state: tuple[int, ...]) -> float:
        return evaluate(prob, state, None).value

    params = AnnealParams(iterations=400, restarts=2, final_temperature=0.01 * min(inst["prices"]))
    result = anneal(f, inst["upper"], sizes=inst["capacity"], seed=seed, params=params)
    best = evaluate(prob, result.best, None)
    if exact is None:
        assert not best.feasible
        full = float(np.dot(inst["capacity"], inst["upper"]))
        assert best.shortfall >= inst["need"] - full - 1e-9
    else:
        assert best.feasible and best.cost == exact[1]
