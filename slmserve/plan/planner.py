"""Plan a fleet for one demand, or for every period of a demand trace.

The annealer (:mod:`slmserve.plan.anneal`) minimises the objective
(:mod:`slmserve.plan.objective`) over replica counts per type; the fleet's latency comes from a
:class:`~slmserve.plan.fleet.FleetEvaluator` (the simulator, for ``slmserve plan``). Every
evaluated state passes through :meth:`Planner._objective`, which keeps the cheapest *feasible*
fleet seen — the answer. Its P99 is then re-simulated at the exact utilisation with more
requests (:meth:`FleetEvaluator.verify`): the P99 reported is always the simulator's. If that
longer run misses the SLO, the fleet is excluded (its verified P99 replaces the estimate) and
the annealer searches again from it, up to :data:`VERIFY_ROUNDS` times.

For a trace, each period starts the annealer from the previous period's plan (first restart;
the others start at random states) and charges ``change_cost`` per replica started or stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import msgspec
import numpy as np

from slmserve.plan.anneal import AnnealParams, anneal
from slmserve.plan.exact import lp_bound
from slmserve.plan.fleet import FleetEvaluator
from slmserve.plan.objective import Evaluation, Problem, evaluate

VERIFY_ROUNDS = 8
"""Searches per period: an answer whose verification misses the SLO is excluded and the
annealer runs again from it (its shorter simulations can be optimistic near saturation)."""


class PeriodPlan(msgspec.Struct, kw_only=True):
    """The answer for one period (or the single demand)."""

    period: str
    demand: float
    """Items/s."""
    counts: dict[str, int]
    feasible: bool
    """Capacity covers demand x (1 + headroom) and the simulated P99 is within the SLO."""
    cost_per_hour: float
    change_cost: float
    capacity: float
    """Items/s the fleet serves at saturation."""
    utilisation: float
    p99: float | None
    """Simulated P99 request latency of the answer at the exact demand (s)."""
    slo_met: bool
    shortfall: float
    """Items/s missing from the answer's capacity (0 when covered)."""
    lp_bound: float
    """Fractional lower bound on the hourly cost of covering the demand (``inf``: impossible)."""
    evaluations: int
    simulations: int
    t0: float
    note: str = ""


@dataclass(frozen=True, slots=True)
class PlanSettings:
    slo: float
    headroom: float = 0.0
    change_cost: float = 0.0
    seed: int = 0
    anneal: AnnealParams = field(default_factory=AnnealParams)

    def __post_init__(self) -> None:
        if not self.slo > 0:
            raise ValueError(f"the P99 SLO must be > 0 seconds, got {self.slo}")
        if self.headroom < 0 or self.change_cost < 0:
            raise ValueError("headroom and change cost must be >= 0")


class Planner:
    """Annealing over ``counts[t] in [0, max_count[t]]``; types slower than the SLO even when
    idle are held at zero (no number of them helps)."""

    def __init__(
        self,
        prices: Sequence[float],
        max_counts: Sequence[int],
        fleet: FleetEvaluator,
        settings: PlanSettings,
    ) -> None:
        self.fleet = fleet
        self.names = list(fleet.names)
        self.prices = np.asarray(prices, float)
        self.settings = settings
        caps = np.asarray(max_counts, np.int64)
        too_slow = fleet.unloaded_p99 > settings.slo
        self.ineligible = {
            name: float(p99)
            for name, p99, slow in zip(self.names, fleet.unloaded_p99, too_slow)
            if slow
        }
        self.upper = np.where(too_slow, 0, caps)
        priced = self.prices[(self.upper > 0) & (self.prices > 0)]
        self._resolution = 0.01 * float(priced.min()) if len(priced) else 1e-6

    def plan(
        self, demand: float, *, previous: Sequence[int] | None = None, label: str = "-"
    ) -> PeriodPlan:
        if not demand >= 0 or math.isinf(demand):
            raise ValueError(f"demand must be a finite number >= 0, got {demand}")
        s = self.settings
        prev = tuple(int(x) for x in previous) if previous is not None else None
        problem = Problem(
            prices=self.prices,
            capacity=self.fleet.capacity,
            upper=self.upper,
            demand=demand,
            headroom=s.headroom,
            slo=s.slo,
            previous=prev,
            change_cost=s.change_cost if prev is not None else 0.0,
        )
        rejected: dict[tuple[int, ...], float] = {}  # verified P99 over the SLO

        def latency(counts: Sequence[int], demand: float) -> float:
            verified = rejected.get(tuple(counts))
            return verified if verified is not None else self.fleet.p99(counts, demand)

        best: list[Evaluation] = []

        def objective(state: tuple[int, ...]) -> float:
            ev = evaluate(problem, state, latency)
            if ev.feasible and (not best or ev.value < best[0].value):
                best[:] = [ev]
            return ev.value

        start = self._start(problem, prev)
        params = s.anneal
        if params.final_temperature is None:  # cool down to 1% of the cheapest replica
            params = replace(params, final_temperature=self._resolution)
        evaluations = 0
        for _ in range(VERIFY_ROUNDS):
            best.clear()
            result = anneal(
                objective, self.upper, start=start, sizes=self.fleet.capacity, seed=s.seed,
                params=params,
            )  # fmt: skip
            evaluations += result.evaluations
            answer = best[0] if best else evaluate(problem, result.best, latency)
            p99 = self._verified_p99(answer, demand)
            if not answer.feasible or (p99 is not None and p99 <= s.slo):
                break
            # The search's shorter simulation was optimistic here: exclude it, search again.
            rejected[answer.counts] = math.inf if p99 is None else p99
            start = answer.counts
        return self._report(problem, answer, p99, evaluations, result.t0, label)

    def _verified_p99(self, ev: Evaluation, demand: float) -> float | None:
        if demand == 0:
            return 0.0
        if ev.capacity > demand:
            return self.fleet.verify(ev.counts, demand)
        return None

    def plan_trace(self, periods: Sequence[tuple[str, float]]) -> list[PeriodPlan]:
        plans: list[PeriodPlan] = []
        previous: list[int] | None = None
        for label, demand in periods:
            plan = self.plan(demand, previous=previous, label=label)
            plans.append(plan)
            previous = [plan.counts[n] for n in self.names]
        return plans

    def _start(self, problem: Problem, previous: tuple[int, ...] | None) -> tuple[int, ...]:
        """The previous plan (clipped to today's caps), else cheapest capacity first."""
        if previous is not None:
            return tuple(int(min(x, u)) for x, u in zip(previous, self.upper))
        counts = np.zeros(len(self.names), np.int64)
        need = problem.required
        for t in np.argsort(self.prices / np.maximum(self.fleet.capacity, 1e-300)):
            if need <= 0:
                break
            k = min(int(self.upper[t]), math.ceil(need / self.fleet.capacity[t]))
            counts[t] = k
            need -= k * self.fleet.capacity[t]
        return tuple(int(x) for x in counts)

    def _report(
        self,
        problem: Problem,
        ev: Evaluation,
        p99: float | None,
        evaluations: int,
        t0: float,
        label: str,
    ) -> PeriodPlan:
        demand = problem.demand
        slo_met = p99 is not None and p99 <= self.settings.slo
        max_capacity = float(self.fleet.capacity @ self.upper)
        notes = []
        if ev.shortfall > 0:
            notes.append(
                f"infeasible: short by {ev.shortfall:.4g} items/s; every available replica "
                f"serves {max_capacity:.4g} items/s, {problem.required:.4g} are required"
            )
        elif not slo_met:
            shown = "-" if p99 is None else f"{p99:.4g} s"
            notes.append(f"SLO not met: simulated P99 {shown} > {self.settings.slo:g} s")
        return PeriodPlan(
            period=label,
            demand=demand,
            counts=dict(zip(self.names, ev.counts)),
            feasible=ev.shortfall == 0 and slo_met,
            cost_per_hour=ev.cost,
            change_cost=ev.change,
            capacity=ev.capacity,
            utilisation=demand / ev.capacity if ev.capacity > 0 else math.inf,
            p99=p99,
            slo_met=slo_met,
            shortfall=ev.shortfall,
            lp_bound=lp_bound(self.prices, self.fleet.capacity, self.upper, problem.required),
            evaluations=evaluations,
            simulations=self.fleet.simulations,
            t0=t0,
            note="; ".join(notes),
        )
