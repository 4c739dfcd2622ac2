"""``slmserve simulate --replicas N --router d2lpm,cache_aware,...``: routers × loads.

    slmserve simulate --workload zipf-clients --replicas 4 \\
        --router d2lpm,cache_aware,round_robin,least_load --load 0.7,1.0 --out cluster-out

Capacity (the unit of ``--load``) is ``N ×`` one replica's capacity (:func:`measure_capacity`:
FCFS saturated on the same requests). Every replica gets the same engine limits and cost
model, and a fresh local scheduler: ``--local-scheduler`` (default ``auto``: ``dlpm`` behind
``d2lpm`` — the "double" deficit — and ``lpm``, SGLang's default, behind the others). Writes
``DIR/results.json`` with per run a :class:`~slmserve.sim.cluster.ClusterSummary` and, unless
``--no-requests``, the per-request records with the replica each one went to.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slmserve.config import ConfigError, parse_options
from slmserve.plugins import PluginManager
from slmserve.routing.base import Router
from slmserve.sim import report
from slmserve.sim.cli import (
    SchedulerSpec,
    _num,
    _sim_config,
    _workload_info,
    make_scheduler,
    parse_loads,
    parse_scheduler_specs,
)
from slmserve.sim.cluster import ClusterSummary, ReplicaSpec, simulate_cluster, summarize_cluster
from slmserve.sim.simulator import CostModel, measure_capacity
from slmserve.sim.workloads import make_workload

NATIVE_LOCAL = {"d2lpm": "dlpm"}
"""Local scheduler per router under ``--local-scheduler auto``; others get ``lpm``."""


def make_router(spec: SchedulerSpec, plugins: PluginManager) -> Router:
    factory = plugins.routers.get(spec.name)
    try:
        return factory(**spec.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"router {spec.label!r}: {exc}") from None


def local_spec(router: SchedulerSpec, text: str) -> SchedulerSpec:
    if text == "auto":
        name = NATIVE_LOCAL.get(router.name, "lpm")
        return SchedulerSpec(name, name, {})
    (spec,) = parse_scheduler_specs(text)
    return spec


def cmd_simulate_cluster(args: argparse.Namespace, plugins: PluginManager) -> int:
    if args.replicas < 1:
        raise ConfigError("--replicas must be >= 1")
    routers = parse_scheduler_specs(args.router or "d2lpm,cache_aware,round_robin,least_load")
    for spec in routers:  # fail fast on a bad name or option
        make_router(spec, plugins)
        make_scheduler(local_spec(spec, args.local_scheduler), plugins)
    if args.closed_loop is not None:
        raise ConfigError("--closed-loop is not supported with --replicas (open loop only)")
    loads = parse_loads(args.load)
    name, options = args.workload, parse_options(args.workload_opt)
    if args.trace is not None:
        name, options = "trace", {**options, "path": args.trace}
    try:
        workload = make_workload(name, seed=args.seed, **options)
        cost = CostModel.load(args.cost_model) if args.cost_model else CostModel()
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    config = _sim_config(args, workload)
    n = args.replicas
    capacity = args.capacity
    if loads is not None and capacity is None:
        print(f"measuring one replica's capacity (FCFS, saturated) on {len(workload.requests)} ...")
        capacity = n * measure_capacity(workload.requests, config, cost)
    if capacity is not None:
        print(f"cluster capacity: {capacity:.3f} req/s ({n} replicas)")
    points: list[tuple[float | None, float | None]] = [(None, None)]
    if loads is not None:
        assert capacity is not None
        points = [(load, load * capacity) for load in loads]

    entries = []
    for load, rate in points:
        requests = (workload.scaled(rate) if rate is not None else workload).requests
        for spec in routers:
            local = local_spec(spec, args.local_scheduler)
            replicas = [
                ReplicaSpec(f"r{i}", make_scheduler(local, plugins), config, cost) for i in range(n)
            ]
            result = simulate_cluster(
                requests, make_router(spec, plugins), replicas, until=args.until, check=args.check
            )
            entry: dict[str, Any] = {
                "router": spec.label,
                "local_scheduler": local.label,
                "load": load,
                "arrival_rate": rate,
                "summary": summarize_cluster(result),
            }
            if not args.no_requests:
                entry["requests"] = result.records
                entry["replica_of"] = result.replica_of
            entries.append(entry)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "workload": _workload_info(workload),
        "seed": args.seed,
        "replicas": n,
        "config": config,
        "cost_model": cost,
        "capacity_rps": capacity,
        "capacity_definition": f"{n} x one replica's FCFS saturated throughput",
        "until": args.until,
        "runs": entries,
    }
    report.write_json(out / "results.json", results)
    print(format_cluster_table(entries))
    print(f"wrote {out / 'results.json'}")
    return 0


def format_cluster_table(entries: list[dict[str, Any]]) -> str:
    head = (
        f"{'router':<22} {'local':<6} {'load':>5} {'worst p99':>9} {'client':>9} {'p99 lat':>8} "
        f"{'p99 ttft':>8} {'imbal':>6} {'hit':>5} {'req/s':>8}"
    )
    lines = [head, "-" * len(head)]
    for e in entries:
        s: ClusterSummary = e["summary"]
        load = "-" if e["load"] is None else f"{e['load']:g}"
        lines.append(
            f"{e['router']:<22} {e['local_scheduler']:<6} {load:>5} "
            f"{_num(s.worst_client_p99_latency):>9} {s.worst_client or '-':>9} "
            f"{_num(s.latency.p99):>8} {_num(s.ttft.p99):>8} {s.load_imbalance:>6.2f} "
            f"{s.cache_hit_rate:>5.2f} {s.throughput_rps:>8.2f}"
        )
    return "\n".join(lines)
