"""Cluster simulation: N simulated replicas behind one routing policy.

Each replica is a :class:`~slmserve.sim.simulator.SimEngine` — the real ``EngineCore``, radix
cache and local scheduler on simulated time, exactly what :func:`simulate` runs — and the
router is the same :class:`~slmserve.routing.base.Router` object ``slmserve route`` uses. The
replicas step independently; one event loop interleaves them in time:

* a request is routed when it arrives (the router sees each replica's in-flight count and its
  own prefix tree at that moment) and joins its replica's queue at once, also while that
  replica's step is in flight (as a request submitted to a busy server);
* a step ends at ``start + cost.step_time(plan)``; at that instant the replica applies it, the
  router hears which requests finished, arrivals at the same instant are routed, and every idle
  replica with work plans its next step.

With one replica this reproduces :func:`simulate` step for step (a test checks it).

Public entry point (the capacity planner uses it): :func:`simulate_cluster` takes the
requests, a fresh router and one :class:`ReplicaSpec` per replica, and returns a
:class:`ClusterResult` (per-request records and per-replica logs); :func:`summarize_cluster`
turns it into the routing metrics.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from slmserve.interfaces import Scheduler
from slmserve.routing.base import Outcome, Router, RouteRequest
from slmserve.sim.report import Percentiles, max_service_gap, percentiles
from slmserve.sim.simulator import (
    CostModel,
    RequestRecord,
    SimConfig,
    SimEngine,
    SimRequest,
    SimResult,
    prepare,
)


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One simulated replica: a fresh local scheduler, its engine limits and cost model."""

    name: str
    scheduler: Scheduler
    config: SimConfig = field(default_factory=SimConfig)
    cost: CostModel = field(default_factory=CostModel)


@dataclass(slots=True)
class ClusterResult:
    records: list[RequestRecord]
    """Every request, in arrival order."""
    replica_of: dict[str, str]
    """Request id -> the replica that served it (absent: never routed, the run was cut off)."""
    replicas: dict[str, SimResult]
    """Per replica: its step log, cache counters and the records of its requests."""
    router: str
    router_stats: dict[str, Any]
    wall_time: float

    @property
    def end_time(self) -> float:
        return max((r.end_time for r in self.replicas.values()), default=0.0)


def simulate_cluster(
    requests: Iterable[SimRequest],
    router: Router,
    replicas: Sequence[ReplicaSpec],
    *,
    until: float | None = None,
    check: bool = False,
) -> ClusterResult:
    """Route ``requests`` over ``replicas`` with ``router`` and run every replica to the end.

    ``router`` and the schedulers in ``replicas`` must be fresh (they keep state). ``until``:
    no step starts at or after this time (arrivals after it are never routed).
    """
    if not replicas:
        raise ValueError("a cluster needs at least one replica")
    names = [spec.name for spec in replicas]
    reqs, clients, records = prepare(requests, [spec.config for spec in replicas])
    engines = [
        SimEngine(spec.scheduler, spec.config, spec.cost, clients, records, check=check)
        for spec in replicas
    ]
    index = {name: i for i, name in enumerate(names)}
    router.set_replicas(names)
    ends: list[float | None] = [None] * len(engines)
    replica_of: dict[str, str] = {}
    src = deque(reqs)
    cutoff = math.inf if until is None else until

    def start(i: int, now: float) -> None:
        engine = engines[i]
        while engine.has_work() and now < cutoff:
            end = engine.begin(now)
            if end is not None:
                ends[i] = end
                return

    wall0 = time.perf_counter()
    while True:
        next_arrival = src[0].arrival if src and src[0].arrival < cutoff else math.inf
        next_end = min((e for e in ends if e is not None), default=math.inf)
        if math.isinf(next_arrival) and math.isinf(next_end):
            break
        now = min(next_arrival, next_end)
        for i, end in enumerate(ends):
            if end == now:
                ends[i] = None
                for rid in engines[i].complete():
                    rec = records[rid]
                    router.finish(
                        rid,
                        now,
                        Outcome(
                            prompt_tokens=rec.prompt_tokens,
                            cached_tokens=rec.cached_tokens,
                            output_tokens=rec.output_tokens,
                        ),
                    )
        while src and src[0].arrival <= now:
            r = src.popleft()
            name = router.route(
                RouteRequest(r.rid, r.prompt, client_id=r.client, max_new_tokens=r.output_len),
                now,
            )
            replica_of[r.rid] = name
            engines[index[name]].add(r, r.arrival)
        for i, end in enumerate(ends):
            if end is None:
                start(i, now)

    wall = time.perf_counter() - wall0
    return ClusterResult(
        records=[records[r.rid] for r in reqs],
        replica_of=replica_of,
        replicas={name: engines[i].result(wall_time=wall) for i, name in enumerate(names)},
        router=router.name,
        router_stats={k: dict(v) for k, v in router.stats().items()},
        wall_time=wall,
    )


# ---------------------------------------------------------------------------- metrics


class ClientLatency(msgspec.Struct, kw_only=True):
    requests: int
    finished: int
    latency: Percentiles
    """Arrival to finish."""
    ttft: Percentiles
    service: float
    """1 × prompt tokens computed for it + 2 × output tokens, over all replicas."""


class ReplicaLoad(msgspec.Struct, kw_only=True):
    requests: int
    busy_s: float
    """Simulated seconds with a step running."""
    work: float
    """1 × prompt tokens computed + 2 × output tokens."""
    cache_hit_rate: float
    prompt_tokens_computed: int


class ClusterSummary(msgspec.Struct, kw_only=True):
    replicas: int
    requests: int
    finished: int
    duration: float
    """Simulated seconds from the first arrival to the end of the last step."""
    latency: Percentiles
    ttft: Percentiles
    worst_client: str | None
    """The client with the highest P99 latency."""
    worst_client_p99_latency: float | None
    worst_client_p99_ttft: float | None
    load_imbalance: float
    """max / mean of the work the replicas did (1 × prompt tokens computed + 2 × output
    tokens; 1 = perfectly even). Busy time would not do: a batching engine steps whenever
    anything runs, however small the batch."""
    request_imbalance: float
    """max / mean of the requests each replica received."""
    cache_hit_rate: float
    """Prompt tokens found cached at admission / prompt tokens admitted, cluster-wide."""
    throughput_rps: float
    max_service_gap: float
    """Largest service difference between two clients over an interval in which both had a
    request waiting somewhere in the cluster (preemptions ignored)."""
    clients: dict[str, ClientLatency]
    per_replica: dict[str, ReplicaLoad]
    router_stats: dict[str, Any]
    sim_wall_s: float


def _imbalance(values: Sequence[float]) -> float:
    mean = float(np.mean(values)) if len(values) else 0.0
    return float(max(values)) / mean if mean > 0 else 1.0


def cluster_service(
    result: ClusterResult, *, input_price: float = 1.0, output_price: float = 2.0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All replicas' steps merged in time: ``(service[steps, clients], backlogged, clients)``.

    A client counts as backlogged at a step's start when one of its requests has arrived and
    not yet been admitted anywhere (``arrival <= t < first_scheduled``).
    """
    logs = [r.steps for r in result.replicas.values() if len(r.steps)]
    clients = sorted({r.client for r in result.records})
    if not logs:
        empty = np.zeros((0, len(clients)))
        return empty, empty.astype(bool), clients
    # Every replica's log has the same client columns (the cluster's sorted clients).
    start = np.concatenate([s.start for s in logs])
    service = np.concatenate([input_price * s.prompt + output_price * s.output for s in logs])
    order = np.argsort(start, kind="stable")
    start, service = start[order], service[order]
    backlogged = np.zeros(service.shape, bool)
    for ci, c in enumerate(clients):
        mine = [r for r in result.records if r.client == c]
        arrivals = np.sort([r.arrival for r in mine])
        admitted = np.sort([r.first_scheduled for r in mine if r.first_scheduled is not None])
        waiting = np.searchsorted(arrivals, start, "right") - np.searchsorted(admitted, start)
        backlogged[:, ci] = waiting > 0
    return service, backlogged, clients


def summarize_cluster(result: ClusterResult) -> ClusterSummary:
    recs = result.records
    done = [r for r in recs if r.finish is not None]
    started = [r for r in recs if r.first_token is not None]
    first = min((r.arrival for r in recs), default=0.0)
    duration = max(result.end_time - first, 0.0)
    service, backlogged, clients = cluster_service(result)
    per_client: dict[str, ClientLatency] = {}
    for ci, c in enumerate(clients):
        mine = [r for r in recs if r.client == c]
        per_client[c] = ClientLatency(
            requests=len(mine),
            finished=sum(r.finish is not None for r in mine),
            latency=percentiles([r.finish - r.arrival for r in mine if r.finish is not None]),  # type: ignore[operator]
            ttft=percentiles([r.ttft for r in mine if r.first_token is not None]),
            service=float(service[:, ci].sum()) if len(service) else 0.0,
        )
    worst = max(
        (c for c in per_client if per_client[c].latency.p99 is not None),
        key=lambda c: per_client[c].latency.p99 or 0.0,
        default=None,
    )
    ttfts = [v.ttft.p99 for v in per_client.values() if v.ttft.p99 is not None]
    replicas: dict[str, ReplicaLoad] = {}
    hits = queries = 0
    for name, res in result.replicas.items():
        hits += res.prefix_hits
        queries += res.prefix_queries
        replicas[name] = ReplicaLoad(
            requests=len(res.records),
            busy_s=float((res.steps.end - res.steps.start).sum()),
            work=float(res.steps.prompt.sum() + 2 * res.steps.output.sum()),
            cache_hit_rate=res.prefix_hits / res.prefix_queries if res.prefix_queries else 0.0,
            prompt_tokens_computed=res.prompt_tokens_computed,
        )
    return ClusterSummary(
        replicas=len(result.replicas),
        requests=len(recs),
        finished=len(done),
        duration=duration,
        latency=percentiles([r.finish - r.arrival for r in done]),  # type: ignore[operator]
        ttft=percentiles([r.ttft for r in started]),
        worst_client=worst,
        worst_client_p99_latency=per_client[worst].latency.p99 if worst else None,
        worst_client_p99_ttft=max(ttfts) if ttfts else None,
        load_imbalance=_imbalance([r.work for r in replicas.values()]),
        request_imbalance=_imbalance([r.requests for r in replicas.values()]),
        cache_hit_rate=hits / queries if queries else 0.0,
        throughput_rps=len(done) / duration if duration > 0 else 0.0,
        max_service_gap=max_service_gap(service, backlogged) if len(service) else 0.0,
        clients=per_client,
        per_replica=replicas,
        router_stats=result.router_stats,
        sim_wall_s=result.wall_time,
    )
