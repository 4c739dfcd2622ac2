"""``slmserve simulate``: schedulers × loads on one workload, in the discrete-event simulator.

    slmserve simulate --workload klpm --schedulers fcfs,lpm,klpm:k=4,vtc,dlpm:q=2048 \\
        --load 0.5,0.9,1.2 --seed 0 --out sim-out

Loads are multiples of the workload's **capacity** (:func:`measure_capacity`: FCFS's saturated
throughput on the same requests, engine limits and cost model), applied by rescaling the
workload's arrival times. Without ``--load`` the workload's own arrival times are used.
Writes ``DIR/results.json`` (configuration, capacity, per run a :class:`Summary`, service over
time and per-request records) and PNG plots (P99 TTFT vs load; service over time per client).
With ``--replicas N`` or ``--router`` it simulates a cluster instead (``cluster_cli.py``).

``add_simulate_parser(subparsers, plugins)`` registers the subcommand on the main CLI's parser
and returns its handler ``(args, plugins) -> exit code``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from slmserve.config import ConfigError, parse_options
from slmserve.interfaces import PluginError, Scheduler
from slmserve.plugins import PluginManager
from slmserve.sim import report
from slmserve.sim.simulator import (
    CAPACITY_DEFINITION,
    CostModel,
    SimConfig,
    measure_capacity,
    simulate,
)
from slmserve.sim.workloads import WORKLOADS, Workload, make_workload

DEFAULT_SCHEDULERS = "fcfs,lpm,klpm:k=4,vtc,dlpm:q=2048"

OPTION_ALIASES: dict[str, dict[str, str]] = {"dlpm": {"q": "quantum"}}
"""Short option names accepted in ``--schedulers`` specs."""


@dataclass(frozen=True, slots=True)
class SchedulerSpec:
    """``name[:key=value[:key=value...]]`` from ``--schedulers``; ``label`` is the text."""

    label: str
    name: str
    options: dict[str, Any]


def parse_scheduler_specs(text: str) -> list[SchedulerSpec]:
    """``"fcfs,klpm:k=4,dlpm:q=2048"`` -> specs (values read as TOML, like ``--scheduler-opt``)."""
    specs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, *pairs = part.split(":")
        options = parse_options(pairs)
        aliases = OPTION_ALIASES.get(name, {})
        options = {aliases.get(k, k): v for k, v in options.items()}
        specs.append(SchedulerSpec(part, name.strip(), options))
    if not specs:
        raise ConfigError("--schedulers needs at least one scheduler")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--schedulers lists a scheduler twice: {text!r}")
    return specs


def make_scheduler(spec: SchedulerSpec, plugins: PluginManager) -> Scheduler:
    factory = plugins.schedulers.get(spec.name)
    try:
        return factory(**spec.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scheduler {spec.label!r}: {exc}") from None


def parse_loads(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--load must be comma-separated numbers, got {text!r}") from None
    if not loads or any(not x > 0 for x in loads):
        raise ConfigError(f"--load values must be > 0, got {text!r}")
    return loads


# ---------------------------------------------------------------------------- one run


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Everything one simulation needs, picklable for a process pool."""

    workload: str
    workload_options: dict[str, Any]
    seed: int
    scheduler: SchedulerSpec
    load: float | None
    rate: float | None
    config: SimConfig
    cost: CostModel
    until: float | None
    closed_loop: int | None
    check: bool
    keep_requests: bool


def run_one(run: RunSpec, plugins: PluginManager | None = None) -> dict[str, Any]:
    """Simulate one (scheduler, load) point; return its JSON-ready entry."""
    plugins = plugins or PluginManager()
    workload = make_workload(run.workload, seed=run.seed, **run.workload_options)
    if run.rate is not None:
        workload = workload.scaled(run.rate)
    result = simulate(
        workload.requests,
        make_scheduler(run.scheduler, plugins),
        run.config,
        run.cost,
        until=run.until,
        backlog=run.closed_loop,
        per_client=True,
        check=run.check,
    )
    entry: dict[str, Any] = {
        "scheduler": run.scheduler.label,
        "load": run.load,
        "arrival_rate": run.rate,
        "summary": report.summarize(result),
        "service_over_time": report.service_over_time(result),
    }
    if run.keep_requests:
        entry["requests"] = result.records
    return entry


# ---------------------------------------------------------------------------- the command


def add_simulate_parser(
    subparsers: Any, plugins: PluginManager
) -> Callable[[argparse.Namespace, PluginManager], int]:
    """Add ``simulate`` to ``subparsers``; return its handler."""
    p = subparsers.add_parser(
        "simulate",
        help="discrete-event simulation of schedulers on a workload",
        description="Schedulers x loads on one workload, in the discrete-event simulator.",
    )
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="klpm", choices=sorted(WORKLOADS))
    g.add_argument("--workload-opt", action="append", metavar="KEY=VALUE", help="generator option")
    g.add_argument("--trace", metavar="FILE.jsonl", help="replay a trace (--workload trace)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("sweep")
    g.add_argument(
        "--schedulers",
        default=DEFAULT_SCHEDULERS,
        metavar="SPEC[,SPEC...]",
        help=f"NAME[:KEY=VALUE...] per scheduler (default {DEFAULT_SCHEDULERS}); "
        f"known: {', '.join(plugins.schedulers.names())}",
    )
    g.add_argument(
        "--load",
        metavar="L[,L...]",
        help="offered loads as multiples of capacity (default: the workload's own arrivals)",
    )
    g.add_argument("--capacity", type=float, help="capacity in req/s (default: measured)")
    g.add_argument(
        "--closed-loop",
        type=int,
        metavar="N",
        help="ignore arrival times; keep N requests of every client waiting (saturation)",
    )
    g.add_argument("--until", type=float, metavar="SECONDS", help="cut the run off at this time")
    g.add_argument("--jobs", type=int, default=1, help="simulations in parallel (processes)")
    g = p.add_argument_group("cluster (several replicas behind a router)")
    g.add_argument("--replicas", type=int, default=1, help="simulated replicas (default 1)")
    g.add_argument(
        "--router",
        metavar="SPEC[,SPEC...]",
        help=f"NAME[:KEY=VALUE...] per routing policy; known: {', '.join(plugins.routers.names())}",
    )
    g.add_argument(
        "--local-scheduler",
        default="auto",
        metavar="SPEC",
        help="each replica's scheduler (default auto: dlpm behind d2lpm, lpm behind the others)",
    )
    g = p.add_argument_group("simulated engine")
    g.add_argument("--kv-tokens", type=int, help="KV pool (default: the workload's suggestion)")
    g.add_argument("--max-batch-tokens", type=int)
    g.add_argument("--chunked-prefill-size", type=int)
    g.add_argument("--max-running-requests", type=int)
    g.add_argument("--cost-model", metavar="FILE", help="TOML/JSON cost model (default: built-in)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="sim-out", metavar="DIR")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-requests", action="store_true", help="leave per-request records out")
    g.add_argument("--check", action="store_true", help="verify KV invariants every step (slow)")
    return cmd_simulate


def cmd_simulate(args: argparse.Namespace, plugins: PluginManager) -> int:
    if args.replicas != 1 or args.router is not None:
        from slmserve.sim.cluster_cli import cmd_simulate_cluster

        return cmd_simulate_cluster(args, plugins)
    specs = parse_scheduler_specs(args.schedulers)
    for spec in specs:  # fail fast on a bad name or option, before any simulation
        make_scheduler(spec, plugins)
    loads = parse_loads(args.load)
    workload_name = args.workload
    options = parse_options(args.workload_opt)
    if args.trace is not None:
        workload_name, options = "trace", {**options, "path": args.trace}
    try:
        workload = make_workload(workload_name, seed=args.seed, **options)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    config = _sim_config(args, workload)
    try:
        cost = CostModel.load(args.cost_model) if args.cost_model else CostModel()
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    if args.until is not None and not args.until > 0:
        raise ConfigError(f"--until must be > 0 seconds, got {args.until}")

    capacity = args.capacity
    if loads is not None and args.closed_loop is not None:
        raise ConfigError("--load and --closed-loop exclude each other")
    if loads is not None and capacity is None:
        print(f"measuring capacity (FCFS, saturated) on {len(workload.requests)} requests ...")
        capacity = measure_capacity(workload.requests, config, cost)
    if capacity is not None:
        print(f"capacity: {capacity:.3f} req/s")

    points: list[tuple[float | None, float | None]] = [(None, None)]
    if loads is not None:
        assert capacity is not None
        points = [(load, load * capacity) for load in loads]
    runs = [
        RunSpec(
            workload=workload_name,
            workload_options=options,
            seed=args.seed,
            scheduler=spec,
            load=load,
            rate=rate,
            config=config,
            cost=cost,
            until=args.until,
            closed_loop=args.closed_loop,
            check=args.check,
            keep_requests=not args.no_requests,
        )
        for load, rate in points
        for spec in specs
    ]
    if args.jobs == 1:
        entries = [run_one(r, plugins) for r in runs]
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            entries = list(pool.map(run_one, runs))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "workload": _workload_info(workload),
        "seed": args.seed,
        "config": config,
        "cost_model": cost,
        "capacity_rps": capacity,
        "capacity_definition": CAPACITY_DEFINITION,
        "until": args.until,
        "closed_loop": args.closed_loop,
        "runs": entries,
    }
    report.write_json(out / "results.json", results)
    print(format_table(entries))
    written = [out / "results.json"]
    if not args.no_plots:
        written += _plots(entries, out, workload.name)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _sim_config(args: argparse.Namespace, workload: Workload) -> SimConfig:
    fields: dict[str, Any] = {}
    kv = args.kv_tokens if args.kv_tokens is not None else workload.kv_tokens
    for key, value in (
        ("kv_tokens", kv),
        ("max_batch_tokens", args.max_batch_tokens),
        ("chunked_prefill_size", args.chunked_prefill_size),
        ("max_running_requests", args.max_running_requests),
    ):
        if value is not None:
            fields[key] = value
    try:
        return msgspec.convert(fields, SimConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid engine limits: {exc}") from None


def _workload_info(workload: Workload) -> dict[str, Any]:
    return {
        "name": workload.name,
        "params": workload.params,
        "requests": len(workload.requests),
        "clients": sorted({r.client for r in workload.requests}),
        "offered_rate": workload.offered_rate,
    }


def format_table(entries: list[dict[str, Any]]) -> str:
    head = (
        f"{'scheduler':<22} {'load':>5} {'ttft p50':>9} {'ttft p99':>9} {'req/s':>8} "
        f"{'tok/s':>9} {'hit':>5} {'gap':>9} {'jain':>5}"
    )
    lines = [head, "-" * len(head)]
    for e in entries:
        s: report.Summary = e["summary"]
        load = "-" if e["load"] is None else f"{e['load']:g}"
        jain = "-" if s.jain_index is None else f"{s.jain_index:.3f}"
        lines.append(
            f"{e['scheduler']:<22} {load:>5} {_num(s.ttft.p50):>9} {_num(s.ttft.p99):>9} "
            f"{s.throughput_rps:>8.2f} {s.throughput_tps:>9.0f} {s.cache_hit_rate:>5.2f} "
            f"{s.max_service_gap:>9.0f} {jain:>5}"
        )
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _plots(entries: list[dict[str, Any]], out: Path, name: str) -> list[Path]:
    written = []
    rows = [(e["scheduler"], e["load"], e["summary"].ttft.p99) for e in entries]
    if any(load is not None for _, load, _ in rows):
        path = out / "p99_ttft_vs_load.png"
        report.plot_metric_vs_load(rows, path, title=f"{name}: P99 TTFT")  # type: ignore[arg-type]
        written.append(path)
    top = max((e["load"] or 0.0 for e in entries), default=0.0)
    series = [
        (e["scheduler"], e["service_over_time"]) for e in entries if (e["load"] or 0.0) == top
    ]
    path = out / "service_over_time.png"
    suffix = f" at load {top:g}" if top else ""
    report.plot_service(series, path, title=f"{name}: cumulative service per client{suffix}")
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m slmserve.sim.cli``), same as ``slmserve simulate``."""
    try:
        plugins = PluginManager()
    except PluginError as exc:
        print(f"slmserve: plugin error: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="slmserve")
    sub = parser.add_subparsers(dest="command", required=True)
    handler = add_simulate_parser(sub, plugins)
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    try:
        return handler(args, plugins)
    except (ConfigError, PluginError) as exc:
        print(f"slmserve simulate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
