"""``slmserve bench profile`` and ``slmserve plan``.

    slmserve bench profile --model demo --prompt-tokens 256 --shared-prefix 0.5 \\
        --output-tokens 16 --loads 0.2,0.4,0.6,0.8,0.9 --out profile.toml
    slmserve plan --catalog catalog.toml --demand 120 --slo-p99 0.5 --out plan-out
    slmserve plan --catalog catalog.toml --demand-trace hourly.csv --slo-p99 0.5 \\
        --change-cost 0.5 --out plan-out

``add_plan_parsers(subparsers, plugins)`` registers both on the main CLI and returns their
handlers by command name.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmserve.config import ConfigError
from slmserve.plugins import PluginManager

Handler = Callable[[argparse.Namespace, PluginManager], int]

DEFAULT_LOADS = "0.2,0.4,0.6,0.8,0.9"


def add_plan_parsers(subparsers: Any, plugins: PluginManager) -> dict[str, Handler]:
    """Add ``bench`` (with ``profile``) and ``plan``; return ``{command: handler}``."""
    return {"bench": _add_bench(subparsers, plugins), "plan": _add_plan(subparsers)}


# ---------------------------------------------------------------------------- bench profile


def _add_bench(subparsers: Any, plugins: PluginManager) -> Handler:
    from slmserve.cli import add_engine_args  # here: slmserve.cli imports this module

    bench = subparsers.add_parser("bench", help="measure this machine (bench profile)")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = sub.add_parser(
        "profile",
        help="throughput and P99 vs load on the real engine; fit the simulator's cost model",
        description="Run the real engine at increasing load; write a capacity profile.",
    )
    g = p.add_argument_group("workload shape")
    g.add_argument("--prompt-tokens", type=int, default=256, help="tokens per item prompt")
    g.add_argument("--shared-prefix", type=float, default=0.5, help="shared fraction [0, 1)")
    g.add_argument("--output-tokens", type=int, default=16, help="generated tokens per item")
    g.add_argument("--items-per-request", type=int, default=1)
    g.add_argument(
        "--prefix-groups", type=int, default=1, help="distinct shared prefixes (0: per request)"
    )
    g = p.add_argument_group("sweep")
    g.add_argument(
        "--loads",
        default=DEFAULT_LOADS,
        metavar="L[,L...]",
        help=f"offered loads as fractions of the saturated rate (default {DEFAULT_LOADS})",
    )
    g.add_argument("--requests-per-load", type=int, default=120)
    g.add_argument("--saturation-requests", type=int, default=64)
    p.add_argument("--out", default="profile.toml", metavar="FILE", help=".toml or .json")
    add_engine_args(p, plugins)
    return _cmd_bench


def _cmd_bench(args: argparse.Namespace, plugins: PluginManager) -> int:
    from slmserve.cli import engine_config

    if args.bench_command != "profile":  # pragma: no cover - argparse enforces the choice
        raise ConfigError(f"unknown bench command {args.bench_command!r}")
    shape = _shape(args)
    loads = _loads(args.loads)
    for name in ("requests_per_load", "saturation_requests"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    out = Path(args.out)
    if out.suffix not in (".toml", ".json"):
        raise ConfigError(f"--out must end in .toml or .json, got {out}")
    config = engine_config(args)
    profile = asyncio.run(_profile(config, plugins, shape, loads, args))
    from slmserve.plan.profile import write_profile

    out.parent.mkdir(parents=True, exist_ok=True)
    write_profile(profile, out)
    print(_profile_table(profile))
    print(f"wrote {out}")
    return 0


async def _profile(
    config: Any, plugins: PluginManager, shape: Any, loads: list[float], args: argparse.Namespace
) -> Any:
    from slmserve.engine import AsyncEngine
    from slmserve.plan.measure import measure
    from slmserve.plan.profile import EngineSetup, Profile

    # Steps one at a time: the simulator's cost model prices each step on its own.
    engine = AsyncEngine(config.replace(overlap="off"), plugins=plugins)
    async with engine:
        assert engine.core is not None
        m = await measure(
            engine,
            shape,
            loads=loads,
            requests_per_load=args.requests_per_load,
            saturation_requests=args.saturation_requests,
            seed=config.seed,
        )
        limits = engine.core.limits
        setup = EngineSetup(
            kv_tokens=engine.core.allocator.num_slots,
            max_batch_tokens=limits.max_batch_tokens,
            chunked_prefill_size=limits.chunked_prefill_size,
            max_running_requests=limits.max_running_requests,
            scheduler=config.scheduler,
        )
        provenance = _provenance(engine, config)
    return Profile(
        source=f"measured by `slmserve bench profile` on {provenance.host} "
        f"({provenance.device_name}) at {provenance.date}",
        cost_model=m.cost_model,
        engine=setup,
        workload=shape,
        measured=provenance,
        fit=m.fit,
        saturation=m.saturation,
        load=m.loads,
    )


def _provenance(engine: Any, config: Any) -> Any:
    import torch

    import slmserve
    from slmserve.plan.profile import Provenance

    info = engine.backend.info
    device_name = _cpu_name()
    if info.device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(torch.device(info.device))
    decoder = getattr(engine.backend, "decoder", None)
    params = sum(p.numel() for p in decoder.parameters()) if decoder is not None else -1
    return Provenance(
        tool="slmserve bench profile",
        command=shlex.join(["slmserve", *sys.argv[1:]]),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(),
        platform=platform.platform(),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count() or 0,
        device=info.device,
        device_name=device_name,
        torch_version=str(torch.__version__),
        torch_threads=torch.get_num_threads(),
        python_version=platform.python_version(),
        slmserve_version=slmserve.__version__,
        model=config.model or "demo",
        model_parameters=params,
        dtype=info.dtype,
        seed=config.seed,
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _shape(args: argparse.Namespace) -> Any:
    import msgspec

    from slmserve.plan.workload import Shape

    try:
        return msgspec.convert(
            {
                "prompt_tokens": args.prompt_tokens,
                "shared_prefix": args.shared_prefix,
                "output_tokens": args.output_tokens,
                "items_per_request": args.items_per_request,
                "prefix_groups": args.prefix_groups,
            },
            Shape,
        )
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid workload shape: {exc}") from None


def _loads(text: str) -> list[float]:
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--loads must be comma-separated numbers, got {text!r}") from None
    if not loads or any(not 0 < x <= 1.5 for x in loads):
        raise ConfigError(f"--loads values must be in (0, 1.5], got {text!r}")
    return sorted(loads)


def _profile_table(profile: Any) -> str:
    sat, fit = profile.saturation, profile.fit
    lines = [
        f"saturated: {sat.items_per_s:.2f} items/s, {sat.requests_per_s:.2f} requests/s, "
        f"{sat.tokens_per_s:.0f} tokens/s (simulator with the fitted model: "
        f"{sat.sim_items_per_s:.2f} items/s)",
        f"cost model fitted on {fit.steps} steps: R² {fit.r2:.3f}, median |error| "
        f"{fit.median_abs_rel_error:.0%} per step, total {fit.total_rel_error:+.1%}",
        f"{'load':>5} {'req/s':>7} {'items/s':>8} {'tok/s':>8} {'P50 s':>7} {'P99 s':>7} "
        f"{'sim P50':>8} {'sim P99':>8}",
    ]
    for p in profile.load:
        lines.append(
            f"{p.load:>5.2f} {p.requests_per_s:>7.2f} {p.items_per_s:>8.2f} {p.tokens_per_s:>8.0f} "
            f"{p.p50:>7.3f} {p.p99:>7.3f} {p.sim_p50:>8.3f} {p.sim_p99:>8.3f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plan


def _add_plan(subparsers: Any) -> Handler:
    p = subparsers.add_parser(
        "plan",
        help="cheapest fleet (types x replicas) meeting a P99 SLO, by simulated annealing",
        description="Capacity planning by simulated annealing over replica counts per type; "
        "fleet latency from the discrete-event simulator.",
    )
    p.add_argument("--catalog", required=True, metavar="FILE.toml", help="instance types")
    d = p.add_mutually_exclusive_group(required=True)
    d.add_argument("--demand", type=float, metavar="ITEMS_PER_S", help="one demand level")
    d.add_argument("--demand-trace", metavar="FILE", help="CSV (period,demand) or JSONL per period")
    p.add_argument("--slo-p99", type=float, required=True, metavar="SECONDS")
    p.add_argument("--headroom", type=float, default=0.0, help="spare capacity fraction (0.2)")
    p.add_argument(
        "--change-cost", type=float, default=0.0, help="cost per replica started or stopped"
    )
    g = p.add_argument_group("annealing")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--restarts", type=int, default=4)
    g.add_argument("--iterations", type=int, default=1500, help="moves per restart")
    g = p.add_argument_group("simulation")
    g.add_argument("--scheduler", default=None, help="scheduler spec (default: the profiles')")
    g.add_argument("--sim-requests", type=int, default=600, help="requests per simulation")
    g.add_argument(
        "--router",
        default="none",
        help="verify the answer behind this router on the cluster simulator (e.g. "
        "least_load, d2lpm, cache_aware); default 'none': the capacity split only",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default="plan-out", metavar="DIR")
    g.add_argument("--no-plot", action="store_true")
    return _cmd_plan


def _cmd_plan(args: argparse.Namespace, plugins: PluginManager) -> int:
    from slmserve.plan.anneal import AnnealParams
    from slmserve.plan.catalog import load_catalog
    from slmserve.plan.demand import read_demand_trace
    from slmserve.plan.fleet import ReplicaType, RoutedSimFleet, SplitSimFleet
    from slmserve.plan.planner import Planner, PlanSettings
    from slmserve.plan.report import format_table, plot_plan
    from slmserve.sim import report as sim_report
    from slmserve.sim.cli import make_scheduler, parse_scheduler_specs

    for flag, value, low in (
        ("--restarts", args.restarts, 1),
        ("--iterations", args.iterations, 1),
        ("--sim-requests", args.sim_requests, 10),
    ):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}")
    catalog = load_catalog(args.catalog)
    if args.demand_trace:
        periods = read_demand_trace(args.demand_trace)
    else:
        if not (args.demand >= 0 and args.demand < float("inf")):
            raise ConfigError(f"--demand must be a finite number >= 0, got {args.demand}")
        periods = [("-", args.demand)]
    try:
        settings = PlanSettings(
            slo=args.slo_p99,
            headroom=args.headroom,
            change_cost=args.change_cost,
            seed=args.seed,
            anneal=AnnealParams(iterations=args.iterations, restarts=args.restarts),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    spec_text = args.scheduler or catalog.types[0].profile.engine.scheduler
    (spec,) = parse_scheduler_specs(spec_text)[:1]
    make_scheduler(spec, plugins)  # fail fast on a bad name or option
    types = [
        ReplicaType(t.name, t.profile.cost_model, t.profile.engine.sim_config())
        for t in catalog.types
    ]
    print(f"simulating one replica of each of {len(types)} types ...")
    sim_options: dict[str, Any] = {
        "requests": args.sim_requests,
        "verify_requests": 4 * args.sim_requests,
        "seed": args.seed,
    }
    fleet: SplitSimFleet
    if args.router == "none":
        fleet = SplitSimFleet(
            types, catalog.shape, lambda: make_scheduler(spec, plugins), **sim_options
        )
    else:
        from slmserve.sim.cluster_cli import make_router

        (router_spec,) = parse_scheduler_specs(args.router)[:1]
        make_router(router_spec, plugins)  # fail fast on a bad name or option
        fleet = RoutedSimFleet(
            types,
            catalog.shape,
            lambda: make_scheduler(spec, plugins),
            lambda: make_router(router_spec, plugins),
            **sim_options,
        )
    planner = Planner(
        [t.price_per_hour for t in catalog.types],
        [t.max_count for t in catalog.types],
        fleet,
        settings,
    )
    plans = planner.plan_trace(periods)
    names = [t.name for t in catalog.types]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "catalog": catalog.path,
        "workload": catalog.shape,
        "slo_p99": args.slo_p99,
        "headroom": args.headroom,
        "change_cost": args.change_cost,
        "seed": args.seed,
        "scheduler": spec.label,
        "router": args.router,
        "latency_model": "while annealing: demand split in proportion to capacity, one "
        "simulated replica per type (real EngineCore, radix cache, scheduler); the answer's "
        "P99: "
        + (
            "the same split"
            if args.router == "none"
            else f"the whole fleet behind the {args.router} router on the cluster simulator"
        ),
        "types": [
            {
                "name": t.name,
                "price_per_hour": t.price_per_hour,
                "gpus_per_replica": t.gpus_per_replica,
                "max_count": t.max_count,
                "capacity_items_per_s": float(mu),
                "idle_p99": float(idle),
                "eligible": t.name not in planner.ineligible,
                "profile_source": t.profile.source,
                "profile_path": t.profile_path,
            }
            for t, mu, idle in zip(catalog.types, fleet.capacity, fleet.unloaded_p99)
        ],
        "periods": plans,
    }
    sim_report.write_json(out / "plan.json", result)
    print(_types_table(result["types"]))
    if planner.ineligible:
        slow = ", ".join(f"{n} ({v:.3g} s)" for n, v in planner.ineligible.items())
        print(f"not used: P99 over the SLO even on an idle replica: {slow}")
    print(format_table(plans, names))
    written = [out / "plan.json"]
    if not args.no_plot:
        try:
            plot_plan(plans, names, list(fleet.capacity), out / "plan.png")
            written.append(out / "plan.png")
        except RuntimeError as exc:
            print(f"note: {exc}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0 if all(p.feasible for p in plans) else 1


def _types_table(types: list[dict[str, Any]]) -> str:
    lines = [f"{'type':<16} {'$/h':>7} {'max':>4} {'items/s':>9} {'idle P99':>9}  source"]
    for t in types:
        lines.append(
            f"{t['name']:<16} {t['price_per_hour']:>7.3g} {t['max_count']:>4} "
            f"{t['capacity_items_per_s']:>9.4g} {t['idle_p99']:>9.3g}  {t['profile_source'][:60]}"
        )
    return "\n".join(lines)
