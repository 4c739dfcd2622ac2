"""Regenerate the scheduler reproductions of ``docs/schedulers.md`` in the simulator.

(a) **k-LPM paper setting** (workload ``klpm``: 16 groups, 2,000-token shared prefix, 200-500
    unique tokens, 1-10 output tokens, regular arrivals, shuffled groups; KV pool 24,576
    tokens). P99 TTFT of FCFS, LPM (SGLang mode and ideal) and k-LPM with k = 2, 4, 8, over
    offered load 0.5x-1.2x capacity, mean over seeds. Target: at 0.9x, the best k-LPM P99
    below both FCFS's and LPM's.
(b) **Locality vs fairness** (workload ``locality-mix``: client ``docs`` asks about 16
    documents of 4,096 tokens, client ``unique`` sends 768-1,280 unique tokens; KV 32,768).
    Both clients saturated (closed loop: 32 requests of each always waiting), runs cut off at
    30 s and 60 s of simulated time. VTC (artifact charge, and charging computed tokens), LPM and
    DLPM with a Q sweep: token throughput, request throughput, hit rate, max service gap
    between the backlogged clients, Jain's index. Target: DLPM's throughput >= 1.5x VTC's with
    a gap that does not grow with the run length, while LPM's does.

Capacity (the unit of "load") is FCFS's saturated throughput on the same requests, engine and
cost model (``slmserve.sim.measure_capacity``), measured per seed. The cost model is the
built-in default (``slmserve.sim.CostModel``); engine limits are the server's defaults
(2,048-token batches, 512-token prefill chunks, 256 running requests) except the KV pool.

    python benchmarks/reproduce_schedulers.py             # (a), (b), (d): ~5 min on 2 cores
    python benchmarks/reproduce_schedulers.py --quick     # smoke run, seconds
    python benchmarks/reproduce_schedulers.py --parts c   # (c) only: the real engine on CPU

(d) **VTC suites**: the artifact's ``overload`` (2 clients, 1.5 and 3 req/s) and
    ``poisson_short_long_2`` (8 req/s of 512-in/32-out vs 1.5 req/s of 32-in/512-out), arrivals
    rescaled to 1.5x capacity, run to the end of arrivals for 120 and 240 s of nominal time:
    FCFS's service gap between backlogged clients grows with the run, VTC's stays bounded.
(c) **Real engine**: the (a) setting scaled down ~8x (8 groups, 256-token prefixes, 32-96
    unique tokens, 1-4 output tokens, 240 requests; KV 1,536, 512-token batches, 256-token
    chunks) on the 12M-parameter bench model of ``benchmarks/generation.py`` (CPU, fp32). A
    cost model is fitted by least squares to the engine's measured step times (a calibration run
    on another seed), then FCFS, LPM and k-LPM run at 0.8x and 1.0x of the *simulated* capacity
    through both the engine and the simulator, and their P99 TTFTs are compared. Needs torch.

Writes ``benchmarks/out/reproductions.{json,md}`` and the plots under ``docs/img/``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# Let `python benchmarks/reproduce_schedulers.py` work from a checkout without installing.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slmserve.plan.fit import fit_cost_model, step_features  # noqa: E402
from slmserve.plugins import PluginManager  # noqa: E402
from slmserve.sim import (  # noqa: E402
    CAPACITY_DEFINITION,
    CostModel,
    SimConfig,
    make_workload,
    measure_capacity,
    report,
    simulate,
)
from slmserve.sim.cli import RunSpec, make_scheduler, parse_scheduler_specs, run_one  # noqa: E402

KLPM_SCHEDULERS = "fcfs,lpm,lpm:mode=ideal,klpm:k=2,klpm:k=4,klpm:k=8"
KLPM_LOADS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
MIX_SCHEDULERS = (
    "vtc,vtc:input_charge=computed,lpm,lpm:mode=ideal,"
    "dlpm:q=256,dlpm:q=1024,dlpm:q=4096,dlpm:q=16384,dlpm:q=inf"
)
MIX_BACKLOG = 32
MIX_HORIZONS = (30.0, 60.0)


def _capacity(args: tuple[str, dict[str, Any], int, SimConfig]) -> float:
    name, options, seed, config = args
    workload = make_workload(name, seed=seed, **options)
    return measure_capacity(workload.requests, config, CostModel())


def _run(spec: RunSpec) -> dict[str, Any]:
    return run_one(spec)


def _map(fn: Any, items: list[Any], jobs: int) -> list[Any]:
    if jobs == 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(fn, items))


# ---------------------------------------------------------------------------- (a)


def klpm_experiment(seeds: list[int], loads: tuple[float, ...], n: int, jobs: int) -> dict:
    options = {"num_requests": n}
    config = SimConfig(kv_tokens=make_workload("klpm", num_requests=2).kv_tokens or 65_536)
    caps = dict(zip(seeds, _map(_capacity, [("klpm", options, s, config) for s in seeds], jobs)))
    specs = parse_scheduler_specs(KLPM_SCHEDULERS)
    runs = [
        RunSpec(
            workload="klpm",
            workload_options=options,
            seed=seed,
            scheduler=spec,
            load=load,
            rate=load * caps[seed],
            config=config,
            cost=CostModel(),
            until=None,
            closed_loop=None,
            check=False,
            keep_requests=False,
        )
        for seed in seeds
        for load in loads
        for spec in specs
    ]
    entries = _map(_run, runs, jobs)
    rows: dict[tuple[str, float], dict[str, float]] = {}
    for spec in specs:
        for load in loads:
            mine = [
                e["summary"] for e in entries if e["scheduler"] == spec.label and e["load"] == load
            ]
            rows[spec.label, load] = {
                "ttft_p99": statistics.mean(s.ttft.p99 for s in mine),
                "ttft_p50": statistics.mean(s.ttft.p50 for s in mine),
                "hit_rate": statistics.mean(s.cache_hit_rate for s in mine),
                "preemptions": statistics.mean(s.preemptions for s in mine),
            }
    return {
        "config": config,
        "options": options,
        "seeds": seeds,
        "capacity_rps": caps,
        "rows": [{"scheduler": k[0], "load": k[1], **v} for k, v in rows.items()],
        "labels": [s.label for s in specs],
        "loads": list(loads),
    }


def klpm_table(res: dict) -> str:
    labels, loads = res["labels"], res["loads"]
    cell = {(r["scheduler"], r["load"]): r for r in res["rows"]}
    lines = [
        "| load | " + " | ".join(f"`{x}`" for x in labels) + " |",
        "|---:|" + "---:|" * len(labels),
    ]
    for load in loads:
        vals = [cell[x, load]["ttft_p99"] for x in labels]
        best = min(vals)
        parts = [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in vals]
        lines.append(f"| {load:.1f}× | " + " | ".join(parts) + " |")
    lines.append("")
    lines.append(
        "Cache hit rate at 0.9×: "
        + ", ".join(f"`{x}` {cell[x, 0.9]['hit_rate']:.2f}" for x in labels if (x, 0.9) in cell)
    )
    return "\n".join(lines)


def klpm_target(res: dict) -> tuple[bool, str]:
    cell = {(r["scheduler"], r["load"]): r["ttft_p99"] for r in res["rows"]}
    if (("fcfs", 0.9)) not in cell:
        return False, "0.9x not in the sweep"
    klpm = {x: cell[x, 0.9] for x in res["labels"] if x.startswith("klpm")}
    best_k, best = min(klpm.items(), key=lambda kv: kv[1])
    lpm = min(cell["lpm", 0.9], cell["lpm:mode=ideal", 0.9])
    ok = best < cell["fcfs", 0.9] and best < lpm
    return ok, (
        f"at 0.9x: best k-LPM ({best_k}) P99 {best:.3f} s vs FCFS {cell['fcfs', 0.9]:.3f} s, "
        f"best LPM {lpm:.3f} s"
    )


# ---------------------------------------------------------------------------- (b)


def mix_experiment(n: int, horizons: tuple[float, ...], jobs: int) -> dict:
    options = {"num_requests": n}
    config = SimConfig(kv_tokens=make_workload("locality-mix", num_requests=2).kv_tokens or 65_536)
    specs = parse_scheduler_specs(MIX_SCHEDULERS)
    runs = [
        RunSpec(
            workload="locality-mix",
            workload_options=options,
            seed=0,
            scheduler=spec,
            load=None,
            rate=None,
            config=config,
            cost=CostModel(),
            until=horizon,
            closed_loop=MIX_BACKLOG,
            check=False,
            keep_requests=False,
        )
        for horizon in horizons
        for spec in specs
    ]
    entries = _map(_run, runs, jobs)
    for run, entry in zip(runs, entries):
        entry["until"] = run.until
    reqs = make_workload("locality-mix", **options).requests
    charge = max(len(r.prompt) for r in reqs) + 2 * max(r.output_len for r in reqs)
    return {
        "config": config,
        "options": options,
        "entries": entries,
        "horizons": list(horizons),
        "max_request_charge": charge,
    }


def mix_table(res: dict) -> str:
    short, long = res["horizons"][0], res["horizons"][-1]
    by = {(e["scheduler"], e["until"]): e["summary"] for e in res["entries"]}
    labels = list(dict.fromkeys(e["scheduler"] for e in res["entries"]))
    lines = [
        f"| scheduler | tok/s | req/s | hit rate | max gap ({short:g} s) | max gap ({long:g} s) "
        f"| Jain | docs / unique finished |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in labels:
        s, l_ = by[x, short], by[x, long]
        jain = "-" if l_.jain_index is None else f"{l_.jain_index:.3f}"
        lines.append(
            f"| `{x}` | {l_.throughput_tps:,.0f} | {l_.throughput_rps:.1f} | "
            f"{l_.cache_hit_rate:.2f} | {s.max_service_gap:,.0f} | {l_.max_service_gap:,.0f} | "
            f"{jain} | {l_.clients['docs'].finished} / {l_.clients['unique'].finished} |"
        )
    return "\n".join(lines)


def mix_target(res: dict) -> tuple[bool, str]:
    """DLPM >= 1.5x VTC's token throughput with a gap that does not grow; LPM's grows.

    "Does not grow": doubling the run adds less to the max gap than one request's largest
    possible charge (``res["max_request_charge"]``); LPM's must grow by more than that.
    """
    short, long = res["horizons"][0], res["horizons"][-1]
    slack = res["max_request_charge"]
    by = {(e["scheduler"], e["until"]): e["summary"] for e in res["entries"]}
    vtc = max(by[x, long].throughput_tps for x in ("vtc", "vtc:input_charge=computed"))
    dlpm = [x for x, t in by if x.startswith("dlpm") and t == long and x != "dlpm:q=inf"]

    def growth(x: str) -> float:
        return by[x, long].max_service_gap - by[x, short].max_service_gap

    good = [x for x in dlpm if by[x, long].throughput_tps >= 1.5 * vtc and growth(x) <= slack]
    lpm_grows = growth("lpm") > slack
    best = max(dlpm, key=lambda x: by[x, long].throughput_tps)
    return bool(good) and lpm_grows, (
        f"best VTC {vtc:,.0f} tok/s; best DLPM (`{best}`) {by[best, long].throughput_tps:,.0f} "
        f"tok/s = {by[best, long].throughput_tps / vtc:.2f}x; DLPM settings with >= 1.5x and a "
        f"gap growing by less than one request's charge ({slack:,.0f}) from {short:g} s to "
        f"{long:g} s: {', '.join(f'`{x}`' for x in good) or 'none'}; LPM's gap grows by "
        f"{growth('lpm'):,.0f}"
    )


# ---------------------------------------------------------------------------- (d) VTC suites

VTC_SUITES = ("vtc-overload", "vtc-poisson-short-long-2")
VTC_DURATIONS = (120.0, 240.0)
VTC_LOAD = 1.5


def _vtc_point(args: tuple[str, float, str]) -> dict[str, Any]:
    suite, duration, name = args
    workload = make_workload(suite, duration=duration)
    config = SimConfig()
    capacity = measure_capacity(workload.requests, config)
    scaled = workload.scaled(VTC_LOAD * capacity)
    until = max(r.arrival for r in scaled.requests)
    sched = make_scheduler(parse_scheduler_specs(name)[0], PluginManager())
    summary = report.summarize(simulate(scaled.requests, sched, config, until=until))
    return {"suite": suite, "duration": duration, "scheduler": name, "summary": summary}


def vtc_experiment(durations: tuple[float, ...], jobs: int) -> dict:
    points = [(s, d, n) for s in VTC_SUITES for d in durations for n in ("fcfs", "vtc")]
    return {"durations": list(durations), "entries": _map(_vtc_point, points, jobs)}


def vtc_table(res: dict) -> str:
    short, long = res["durations"][0], res["durations"][-1]
    by = {(e["suite"], e["duration"], e["scheduler"]): e["summary"] for e in res["entries"]}
    lines = [
        f"| suite | scheduler | max gap ({short:g} s) | max gap ({long:g} s) "
        f"| service per client ({long:g} s) |",
        "|---|---|---:|---:|---|",
    ]
    for suite in VTC_SUITES:
        for name in ("fcfs", "vtc"):
            s, l_ = by[suite, short, name], by[suite, long, name]
            svc = ", ".join(f"{c} {v.service:,.0f}" for c, v in l_.clients.items())
            lines.append(
                f"| `{suite}` | `{name}` | {s.max_service_gap:,.0f} | {l_.max_service_gap:,.0f} "
                f"| {svc} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- (c) real engine

ENGINE_WORKLOAD = {
    "num_requests": 240,
    "groups": 8,
    "prefix_len": 256,
    "suffix_len": [32, 96],
    "output_len": [1, 4],
}
"""The k-LPM setting scaled down ~8x for a 12M-parameter model on CPU."""
ENGINE_CONFIG = SimConfig(kv_tokens=1536, max_batch_tokens=512, chunked_prefill_size=256)
ENGINE_SCHEDULERS = "fcfs,lpm,klpm:k=2,klpm:k=4"
ENGINE_LOADS = (0.8, 1.0)
VOCAB = 8192  # the bench model's (benchmarks/generation.py)


def engine_config(path: Path, spec: Any, limits: SimConfig) -> Any:
    """The bench model on CPU with the simulated engine's limits and ``spec``'s scheduler."""
    from slmserve import EngineConfig

    return EngineConfig(
        model=str(path),
        device="cpu",
        dtype="float32",
        kv_tokens=limits.kv_tokens,
        max_batch_tokens=limits.max_batch_tokens,
        chunked_prefill_size=limits.chunked_prefill_size,
        scheduler=spec.name,
        scheduler_options=spec.options,
        gc_freeze=False,
        torch_threads=1,  # steadier step times on a shared machine
    )


async def _engine_run(path: Path, spec: Any, reqs: list[Any], timed: list) -> list[float]:
    """Replay ``reqs`` (arrival times in seconds from now) through a real AsyncEngine; return
    TTFTs. Each step's features and wall time are appended to ``timed``."""
    import asyncio
    import time as _time

    from slmserve import SamplingParams
    from slmserve.engine import AsyncEngine

    async with AsyncEngine(engine_config(path, spec, ENGINE_CONFIG)) as engine:
        core, sched = engine.core, engine.scheduler
        plan_step, on_step = core.plan_step, sched.on_step
        current: list[Any] = []

        def timed_plan(now: float, hold: frozenset[str] = frozenset()) -> Any:
            plan = plan_step(now, hold)
            current[:] = [_time.perf_counter(), plan]
            return plan

        def timed_on_step(report: Any) -> None:
            on_step(report)
            if current and current[1].items:
                timed.append((step_features(current[1]), _time.perf_counter() - current[0]))

        core.plan_step, sched.on_step = timed_plan, timed_on_step
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(r: Any) -> float:
            await asyncio.sleep(max(0.0, t0 + r.arrival - loop.time()))
            start = t0 + r.arrival
            params = SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0)
            stream = engine.submit([int(t) % (VOCAB - 1) + 1 for t in r.prompt], params)
            first = None
            async for _ in stream:
                if first is None:
                    first = loop.time() - start
            assert first is not None
            return first

        return list(await asyncio.gather(*(one(r) for r in reqs)))


def engine_experiment(seed: int) -> dict:
    """Fit a cost model on the real engine, then compare its P99 TTFTs with the simulator's."""
    import asyncio
    import tempfile

    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generation import build_model

    specs = parse_scheduler_specs(ENGINE_SCHEDULERS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen3-12m"
        build_model(path, 0)
        # Calibration: another seed of the workload, all at once, FCFS.
        calib = make_workload("klpm", seed=seed + 100, **ENGINE_WORKLOAD).at_once().requests
        timed: list = []
        asyncio.run(_engine_run(path, specs[0], calib, timed))
        cost, _ = fit_cost_model([f for f, _ in timed], [t for _, t in timed])
        base = make_workload("klpm", seed=seed, **ENGINE_WORKLOAD)
        capacity = measure_capacity(base.requests, ENGINE_CONFIG, cost)
        runs, steps = [], []
        for load in ENGINE_LOADS:
            w = base.scaled(load * capacity)
            for spec in specs:
                real = asyncio.run(_engine_run(path, spec, w.requests, steps))
                runs.append((load, spec, w, real))
    # The same step-time fit on every step of the measured runs: what the simulator predicts
    # when its cost model is right for the machine as it was during the runs.
    refit, _ = fit_cost_model([f for f, _ in steps], [t for _, t in steps])
    rows = []
    for load, spec, w, real in runs:
        row: dict[str, Any] = {"scheduler": spec.label, "load": load}
        row["real_p50"], row["real_p99"] = map(float, np.percentile(real, [50, 99]))
        for key, model in (("sim", cost), ("refit", refit)):
            sched = make_scheduler(spec, PluginManager())
            ttft = report.summarize(simulate(w.requests, sched, ENGINE_CONFIG, model)).ttft
            row[f"{key}_p50"], row[f"{key}_p99"] = ttft.p50, ttft.p99
        rows.append(row)
    return {
        "cost_model": cost,
        "refit_cost_model": refit,
        "capacity_rps": capacity,
        "rows": rows,
        "steps_fitted": len(timed),
        "steps_refit": len(steps),
    }


def engine_table(res: dict) -> str:
    lines = [
        "| load | scheduler | engine P50 / P99 (s) | simulator, calibrated | simulator, refit |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['load']:.1f}× | `{r['scheduler']}` | {r['real_p50']:.3f} / {r['real_p99']:.3f} "
            f"| {r['sim_p50']:.3f} / {r['sim_p99']:.3f} | {r['refit_p50']:.3f} / "
            f"{r['refit_p99']:.3f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- (e) real engine, (b)

MIX_ENGINE_WORKLOAD = {
    "num_requests": 1200,
    "docs": 4,
    "doc_len": 384,
    "question_len": [16, 32],
    "docs_output": [2, 4],
    "unique_len": [256, 384],
    "unique_output": [2, 4],
}
"""(b) scaled down for the 12M-parameter bench model on CPU: a 1,024-token pool holds two of
the four documents."""
MIX_ENGINE_CONFIG = SimConfig(kv_tokens=1024, max_batch_tokens=512, chunked_prefill_size=256)
MIX_ENGINE_SCHEDULERS = "vtc,lpm,dlpm:q=1024"
MIX_ENGINE_BACKLOG = 4
MIX_ENGINE_SECONDS = 40.0


async def _engine_mix_run(path: Path, spec: Any, reqs: list[Any], seconds: float) -> dict:
    """Closed loop per client on a real AsyncEngine for ``seconds``: each client keeps
    ``MIX_ENGINE_BACKLOG`` requests in flight. Service is charged per step from the scheduler's
    step reports (prompt tokens computed + 2 x output tokens), as in the simulator."""
    import asyncio

    import numpy as np

    from slmserve import SamplingParams
    from slmserve.engine import AsyncEngine

    clients = sorted({r.client for r in reqs})
    diffs: list[float] = [0.0]  # running service difference clients[0] - clients[1]
    done_tokens = [0]
    async with AsyncEngine(engine_config(path, spec, MIX_ENGINE_CONFIG)) as engine:
        sched, on_step = engine.scheduler, engine.scheduler.on_step

        def charged(report: Any) -> None:
            on_step(report)
            step = dict.fromkeys(clients, 0.0)
            for client, prompt, output in report.computed.values():
                step[client] += prompt + 2 * output
            diffs.append(diffs[-1] + step[clients[0]] - step[clients[1]])

        sched.on_step = charged
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        queues = {c: iter([r for r in reqs if r.client == c]) for c in clients}

        async def worker(client: str) -> None:
            for r in queues[client]:
                if loop.time() >= end:
                    return
                params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
                ids = [int(t) % (VOCAB - 1) + 1 for t in r.prompt]
                outputs = 0
                async for out in engine.submit(ids, params, client_id=client):
                    outputs += len(out.new_token_ids)
                if loop.time() < end:
                    done_tokens[0] += len(ids) + outputs

        await asyncio.gather(*(worker(c) for c in clients for _ in range(MIX_ENGINE_BACKLOG)))
        hits, queries = engine.core.prefix_hits, engine.core.prefix_queries
    d = np.asarray(diffs)
    return {
        "throughput_tps": done_tokens[0] / seconds,
        "cache_hit_rate": hits / queries if queries else 0.0,
        "max_service_gap": float(d.max() - d.min()),
    }


def mix_engine_experiment() -> dict:
    """(b) on the real engine, and the simulator's prediction with a cost model fitted there."""
    import asyncio
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generation import build_model

    specs = parse_scheduler_specs(MIX_ENGINE_SCHEDULERS)
    work = make_workload("locality-mix", **MIX_ENGINE_WORKLOAD)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen3-12m"
        build_model(path, 0)
        steps: list = []
        calib = make_workload("klpm", seed=100, **ENGINE_WORKLOAD).at_once().requests
        asyncio.run(_engine_run(path, specs[0], calib, steps))
        cost, _ = fit_cost_model([f for f, _ in steps], [t for _, t in steps])
        for spec in specs:
            real = asyncio.run(_engine_mix_run(path, spec, work.requests, MIX_ENGINE_SECONDS))
            sched = make_scheduler(spec, PluginManager())
            sim = report.summarize(
                simulate(
                    work.requests,
                    sched,
                    MIX_ENGINE_CONFIG,
                    cost,
                    until=MIX_ENGINE_SECONDS,
                    backlog=MIX_ENGINE_BACKLOG,
                    per_client=True,
                )
            )
            rows.append({"scheduler": spec.label, "engine": real, "sim": sim})
    return {"cost_model": cost, "rows": rows, "seconds": MIX_ENGINE_SECONDS}


def mix_engine_table(res: dict) -> str:
    lines = [
        "| scheduler | engine tok/s | sim tok/s | engine hit rate | sim hit rate "
        "| engine max gap | sim max gap |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        e, s = r["engine"], r["sim"]
        lines.append(
            f"| `{r['scheduler']}` | {e['throughput_tps']:,.0f} | {s.throughput_tps:,.0f} | "
            f"{e['cache_hit_rate']:.2f} | {s.cache_hit_rate:.2f} | "
            f"{e['max_service_gap']:,.0f} | {s.max_service_gap:,.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run of (a) and (b)")
    p.add_argument(
        "--parts", default="a,b,d", help="which of a,b,c,d,e (c, e: (a), (b) on the real engine)"
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img"))
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    out, img = Path(args.out), Path(args.img)
    out.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    md: list[str] = []
    data: dict[str, Any] = {}

    if "a" in parts:
        if args.quick:
            a = klpm_experiment(seeds[:1], (0.5, 0.9, 1.2), 300, args.jobs)
        else:
            a = klpm_experiment(seeds, KLPM_LOADS, 2000, args.jobs)
        ok, why = klpm_target(a)
        caps = ", ".join(f"{v:.1f}" for v in a["capacity_rps"].values())
        md += [
            f"### (a) k-LPM paper setting: P99 TTFT (s), mean over seeds {a['seeds']}",
            "",
            f"Capacity per seed (req/s): {caps}",
            "",
            klpm_table(a),
            "",
            f"Target {'MET' if ok else 'NOT MET'}: {why}.",
            "",
        ]
        data["klpm"] = a
        rows = [(r["scheduler"], r["load"], r["ttft_p99"]) for r in a["rows"]]
        report.plot_metric_vs_load(
            rows,
            img / "klpm_p99_ttft.png",
            title=f"k-LPM setting: P99 TTFT (mean of {len(a['seeds'])} seeds)",
        )

    if "b" in parts:
        if args.quick:
            b = mix_experiment(1200, (5.0, 10.0), args.jobs)
        else:
            b = mix_experiment(6000, MIX_HORIZONS, args.jobs)
        ok, why = mix_target(b)
        md += [
            f"### (b) Locality vs fairness (both clients saturated, {MIX_BACKLOG} waiting each)",
            "",
            mix_table(b),
            "",
            f"Target {'MET' if ok else 'NOT MET'}: {why}.",
            "",
        ]
        data["locality_mix"] = b
        long = b["horizons"][-1]
        shown = ("vtc:input_charge=computed", "lpm", "dlpm:q=1024")
        series = [
            (e["scheduler"], e["service_over_time"])
            for e in b["entries"]
            if e["until"] == long and e["scheduler"] in shown
        ]
        report.plot_service(
            series,
            img / "locality_mix_service.png",
            title="locality mix, both clients saturated: cumulative service per client",
        )

    if "d" in parts:
        d = vtc_experiment((30.0, 60.0) if args.quick else VTC_DURATIONS, args.jobs)
        md += [
            f"### (d) VTC artifact suites at {VTC_LOAD:g}x capacity: FCFS vs VTC",
            "",
            vtc_table(d),
            "",
        ]
        data["vtc_suites"] = d

    if "c" in parts:
        c = engine_experiment(seeds[0])
        md += [
            "### (c) Real engine (CPU, 12M-parameter bench model) vs the simulator",
            "",
            f"Calibrated cost model ({c['steps_fitted']} steps of a separate run): "
            f"{c['cost_model']}; simulated capacity {c['capacity_rps']:.1f} req/s. Refit on "
            f"the {c['steps_refit']} steps of the runs below: {c['refit_cost_model']}.",
            "",
            engine_table(c),
            "",
        ]
        data["engine"] = c

    if "e" in parts:
        e = mix_engine_experiment()
        md += [
            "### (e) Locality mix on the real engine (CPU, 12M-parameter bench model) vs the "
            "simulator",
            "",
            f"Closed loop, {MIX_ENGINE_BACKLOG} requests in flight per client, "
            f"{e['seconds']:g} s per scheduler; cost model fitted (NNLS) on a calibration run: "
            f"{e['cost_model']}.",
            "",
            mix_engine_table(e),
            "",
        ]
        data["mix_engine"] = e

    md.append(f"{CAPACITY_DEFINITION}.")
    text = "\n".join(md)
    (out / "reproductions.md").write_text(text + "\n")
    report.write_json(out / "reproductions.json", data)
    print(text)
    print(f"\nwrote {out / 'reproductions.md'}, {out / 'reproductions.json'}, plots in {img}")
    print(f"took {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
