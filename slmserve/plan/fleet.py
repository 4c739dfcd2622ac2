"""How a candidate fleet performs: capacity per replica and the fleet's P99 at a demand.

:class:`FleetEvaluator` is the seam. Its first real implementation, :class:`SplitSimFleet`,
splits the demand the way a least-load router does in steady state — every replica gets a
share proportional to its capacity, so every replica runs at the same utilisation
``ρ = demand / Σ n·μ`` — and runs the real simulator (the real ``EngineCore``, radix cache and
scheduler objects) for one replica of each type in use on its share: a Poisson stream of
requests of the workload shape. The fleet P99 is read from the merged per-request records,
each type's requests weighted by the share of traffic it serves (``n_t·μ_t / Σ n·μ``).

What it leaves out: the router itself (prefix-aware routing raises hit rates; a least-load
router sees queue lengths, not capacity) and cross-replica effects. :class:`RoutedSimFleet`
puts them back where it matters: it anneals like ``SplitSimFleet`` (one simulation per type
and utilisation step, cached) but verifies an answer on the cluster simulator — every replica
of the fleet, each with its own radix cache and scheduler, behind the real router policy — so
the P99 the planner reports, and re-plans on when it misses the SLO, is the routed fleet's.

:class:`QueueingFleet` is a cheap analytic stand-in (M/M/1 per replica) for tests of the
annealer; it never produces a planner's answer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slmserve.interfaces import Scheduler
from slmserve.plan.workload import Shape, make_items, request_latencies
from slmserve.routing.base import Router
from slmserve.sim.simulator import CostModel, SimConfig, measure_capacity, simulate


class FleetEvaluator(ABC):
    """Performance of fleets built from a fixed list of replica types."""

    names: list[str]
    capacity: np.ndarray
    """Items/s one replica of each type serves at saturation."""
    unloaded_p99: np.ndarray
    """Latency of one request on an idle replica of each type: no fleet of that type does
    better, so a type above the SLO is ineligible."""

    @abstractmethod
    def p99(self, counts: Sequence[int], demand: float) -> float:
        """Fleet P99 request latency (s) at ``demand`` items/s; ``inf`` if overloaded.
        Used for every state the annealer visits, so it may trade accuracy for speed."""

    def verify(self, counts: Sequence[int], demand: float) -> float:
        """The P99 reported for an answer (more careful than :meth:`p99` where that helps)."""
        return self.p99(counts, demand)

    @property
    def simulations(self) -> int:
        return 0


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative weight reaches ``q`` of the total."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    i = int(np.searchsorted(cum, q * cum[-1] * (1 - 1e-12)))
    return float(values[order][min(i, len(values) - 1)])


@dataclass(frozen=True, slots=True)
class ReplicaType:
    name: str
    cost: CostModel
    config: SimConfig


class SplitSimFleet(FleetEvaluator):
    """Demand split in proportion to capacity, one simulated replica per type in use.

    While annealing, a type's latencies are simulated at the fleet utilisation rounded **up** to
    the next ``grid`` (pessimistic by at most one grid step; at most ``1/grid`` simulations per
    type, cached). :meth:`verify` simulates the exact utilisation with ``verify_requests``.
    """

    def __init__(
        self,
        types: Sequence[ReplicaType],
        shape: Shape,
        scheduler: Callable[[], Scheduler],
        *,
        requests: int = 600,
        verify_requests: int = 2400,
        seed: int = 0,
        grid: float = 0.01,
    ) -> None:
        if not types:
            raise ValueError("a fleet needs at least one replica type")
        self.types = list(types)
        self.names = [t.name for t in self.types]
        self.shape = shape
        self.scheduler = scheduler
        self.grid = grid
        self.work = make_items(shape, requests, seed=seed)
        self.verify_work = make_items(shape, verify_requests, seed=seed)
        self._cache: dict[tuple[int, float], np.ndarray] = {}
        self._sims = 0
        self.capacity = np.array(
            [measure_capacity(self.work.items, t.config, t.cost) for t in self.types]
        )
        one = self.work.head(1)
        self.unloaded_p99 = np.array(
            [
                float(request_latencies(simulate(one, scheduler(), t.config, t.cost).records,
                                        self.work.request_of, 1)[0])
                for t in self.types
            ]
        )  # fmt: skip

    @property
    def simulations(self) -> int:
        return self._sims

    def _latencies(self, t: int, util: float, verify: bool) -> np.ndarray:
        key = (t, util)
        if not verify and key in self._cache:
            return self._cache[key]
        work = self.verify_work if verify else self.work
        rtype = self.types[t]
        rate = util * self.capacity[t] / self.shape.items_per_request  # requests/s
        result = simulate(work.at_rate(rate), self.scheduler(), rtype.config, rtype.cost)
        self._sims += 1
        lat = request_latencies(result.records, work.request_of, work.num_requests)
        if not verify:
            self._cache[key] = lat
        return lat

    def _fleet_p99(self, counts: Sequence[int], demand: float, verify: bool) -> float:
        n = np.asarray(counts, float)
        total = float(n @ self.capacity)
        if total <= demand or demand <= 0:
            return math.inf if demand > 0 else 0.0
        util = demand / total
        if not verify:
            util = min(1.0, math.ceil(util / self.grid - 1e-9) * self.grid)
        values, weights = [], []
        for t in np.flatnonzero(n > 0):
            lat = self._latencies(int(t), util, verify)
            share = n[t] * self.capacity[t] / total
            values.append(lat)
            weights.append(np.full(len(lat), share / len(lat)))
        return weighted_quantile(np.concatenate(values), np.concatenate(weights), 0.99)

    def p99(self, counts: Sequence[int], demand: float) -> float:
        return self._fleet_p99(counts, demand, verify=False)

    def verify(self, counts: Sequence[int], demand: float) -> float:
        return self._fleet_p99(counts, demand, verify=True)


class RoutedSimFleet(SplitSimFleet):
    """:class:`SplitSimFleet` while annealing; :meth:`verify` runs the whole fleet behind
    ``router()`` (a fresh policy object per run) on the cluster simulator."""

    def __init__(
        self,
        types: Sequence[ReplicaType],
        shape: Shape,
        scheduler: Callable[[], Scheduler],
        router: Callable[[], Router],
        **options: Any,
    ) -> None:
        super().__init__(types, shape, scheduler, **options)
        self.router = router

    def verify(self, counts: Sequence[int], demand: float) -> float:
        from slmserve.sim.cluster import ReplicaSpec, simulate_cluster

        n = [int(c) for c in counts]
        if float(np.asarray(n, float) @ self.capacity) <= demand or demand <= 0:
            return math.inf if demand > 0 else 0.0
        replicas = [
            ReplicaSpec(f"{t.name}-{i}", self.scheduler(), t.config, t.cost)
            for t, count in zip(self.types, n)
            for i in range(count)
        ]
        work = self.verify_work
        rate = demand / self.shape.items_per_request  # requests/s
        result = simulate_cluster(work.at_rate(rate), self.router(), replicas)
        self._sims += 1
        lat = request_latencies(result.records, work.request_of, work.num_requests)
        return weighted_quantile(lat, np.ones(len(lat)), 0.99)  # the split model's definition


class QueueingFleet(FleetEvaluator):
    """Analytic stand-in: each replica an M/M/1 queue at the fleet utilisation ``ρ``.

    An M/M/1 sojourn time is exponential with rate ``μ(1 - ρ)``, so one replica's P99 is
    ``ln(100) / (μ(1 - ρ))``; the fleet's is taken as the worst type in use (conservative).
    """

    def __init__(self, names: Sequence[str], capacity: Sequence[float]) -> None:
        self.names = list(names)
        self.capacity = np.asarray(capacity, float)
        self.unloaded_p99 = math.log(100) / self.capacity

    def p99(self, counts: Sequence[int], demand: float) -> float:
        n = np.asarray(counts, float)
        total = float(n @ self.capacity)
        if total <= demand:
            return math.inf
        slack = 1.0 - demand / total
        used = self.capacity[n > 0]
        return float(math.log(100) / (used.min() * slack))
