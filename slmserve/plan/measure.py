"""``slmserve bench profile``'s measurement: the real engine at increasing offered load.

1. **Saturation**: the items of ``saturation_requests`` requests are submitted at once; items/s
   over the makespan is the most this replica serves, and the unit of ``load``.
2. **Load sweep**: for each load ``L``, fresh requests of the same shape arrive as a Poisson
   stream at ``L`` x the saturated request rate; per request we measure latency (planned
   arrival -> last item's final output, so a late client-side submit counts against the
   engine) and TTFT (planned arrival -> the first output of any of its items).
3. **Fit**: every step of both phases is timed from ``plan_step`` to the scheduler's
   ``on_step`` (the whole step: planning, forward, sampling, outputs) and the simulator's
   :class:`CostModel` is fitted to those times (:func:`slmserve.plan.fit.fit_cost_model`).
4. **Check**: the simulator replays every load point's exact requests and arrival times with
   the fitted model; its P50/P99 are written next to the measured ones, so the profile says how
   far to trust the simulator on this machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slmserve.engine.engine import AsyncEngine
from slmserve.plan.fit import FitQuality, fit_cost_model, step_features
from slmserve.plan.profile import LoadPoint, Saturation
from slmserve.plan.workload import ItemWorkload, Shape, make_items, request_latencies
from slmserve.sim.simulator import CostModel, SimConfig, SimRequest, simulate
from slmserve.types import SamplingParams


@dataclass
class StepTimer:
    """Times every engine step. The engine has no per-step hook, so this wraps the two calls
    that bracket a step on the instances (``core.plan_step`` and ``scheduler.on_step``)."""

    features: list[list[float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def attach(self, engine: AsyncEngine) -> None:
        core, scheduler = engine.core, engine.scheduler
        assert core is not None, "start the engine first"
        if engine.overlaps:
            # Two steps in flight would time each one across the other; the simulator's cost
            # model is of steps run one at a time.
            raise ValueError("profile an engine with overlap='off'")
        plan_step, on_step = core.plan_step, scheduler.on_step
        current: list[Any] = []

        def timed_plan(now: float, hold: frozenset[str] = frozenset()) -> Any:
            t0 = time.perf_counter()
            plan = plan_step(now, hold)
            current[:] = [t0, plan]
            return plan

        def timed_on_step(report: Any) -> None:
            on_step(report)
            if current and current[1].items:
                self.features.append(step_features(current[1]))
                self.seconds.append(time.perf_counter() - current[0])
            current.clear()

        core.plan_step = timed_plan  # type: ignore[method-assign]
        scheduler.on_step = timed_on_step  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class Replay:
    """What the engine did with one request set."""

    latency: np.ndarray
    ttft: np.ndarray
    span: float
    """First planned arrival -> last output, seconds."""


@dataclass(frozen=True, slots=True)
class Measurement:
    saturation: Saturation
    loads: list[LoadPoint]
    cost_model: CostModel
    fit: FitQuality


async def replay(engine: AsyncEngine, items: Sequence[SimRequest], work: ItemWorkload) -> Replay:
    """Submit ``items`` at their arrival times (seconds from now); wait for all of them."""
    loop = asyncio.get_running_loop()
    shape = work.shape
    params = SamplingParams(max_tokens=shape.output_tokens, ignore_eos=True, temperature=0.0)
    by_request: dict[int, list[SimRequest]] = {}
    for r in items:
        by_request.setdefault(work.request_of[r.rid], []).append(r)
    t0 = loop.time()

    async def one(reqs: list[SimRequest]) -> tuple[float, float, float]:
        start = t0 + reqs[0].arrival
        await asyncio.sleep(max(0.0, start - loop.time()))
        streams = [engine.submit(r.prompt.tolist(), params) for r in reqs]
        firsts = []
        for stream in streams:
            first = None
            async for out in stream:
                if first is None:
                    first = loop.time()
                if out.finish_reason is not None and out.finish_reason not in ("length", "stop"):
                    raise RuntimeError(f"request failed: {out.finish_reason} {out.error or ''}")
            firsts.append(first if first is not None else loop.time())
        end = loop.time()
        return end - start, min(firsts) - start, end

    rows = await asyncio.gather(*(one(reqs) for reqs in by_request.values()))
    latency, ttft, ends = (np.array(col) for col in zip(*rows))
    return Replay(latency, ttft, float(ends.max() - t0))


async def measure(
    engine: AsyncEngine,
    shape: Shape,
    *,
    loads: Sequence[float],
    requests_per_load: int,
    saturation_requests: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Measurement:
    """Run the saturation and load phases on a started ``engine``; fit and check the model."""
    assert engine.backend is not None and engine.core is not None
    vocab = engine.backend.info.vocab_size
    timer = StepTimer()
    timer.attach(engine)
    limits = engine.core.limits
    config = SimConfig(
        kv_tokens=engine.core.allocator.num_slots,
        max_batch_tokens=limits.max_batch_tokens,
        chunked_prefill_size=limits.chunked_prefill_size,
        max_running_requests=limits.max_running_requests,
    )
    # Warm-up (first-call allocations, lazy initialisation), not timed.
    warm = make_items(shape, 2, seed=seed + 10_000, vocab=vocab)
    await replay(engine, _at_once(warm.items), warm)
    timer.features.clear()
    timer.seconds.clear()

    sat_work = make_items(shape, saturation_requests, seed=seed, vocab=vocab)
    at_once = _at_once(sat_work.items)
    sat = await replay(engine, at_once, sat_work)
    n_items = len(at_once)
    sat_rps = saturation_requests / sat.span
    log(f"saturated: {n_items / sat.span:.1f} items/s ({sat_rps:.2f} requests/s)")

    points: list[tuple[float, float, ItemWorkload, list[SimRequest], Replay]] = []
    for i, load in enumerate(loads):
        work = make_items(shape, requests_per_load, seed=seed + 1 + i, vocab=vocab)
        rate = load * sat_rps
        items = work.at_rate(rate)
        res = await replay(engine, items, work)
        points.append((load, rate, work, items, res))
        p50, p99 = np.percentile(res.latency, [50, 99])
        log(
            f"load {load:g}: {requests_per_load / res.span:.2f} requests/s, "
            f"P50 {p50:.3f} s, P99 {p99:.3f} s"
        )

    cost, quality = fit_cost_model(timer.features, timer.seconds)
    log(f"cost model fitted on {quality.steps} steps: R² {quality.r2:.3f}")
    scheduler = _fresh_scheduler(engine)
    sim = simulate(at_once, scheduler(), config, cost)
    saturation = Saturation(
        requests=saturation_requests,
        seconds=sat.span,
        items_per_s=n_items / sat.span,
        requests_per_s=sat_rps,
        tokens_per_s=n_items * shape.tokens_per_item / sat.span,
        sim_items_per_s=n_items / sim.end_time,
    )
    rows = []
    for load, rate, work, items, res in points:
        sim = simulate(items, scheduler(), config, cost)
        sim_lat = request_latencies(sim.records, work.request_of, work.num_requests)
        n = work.num_requests
        rows.append(
            LoadPoint(
                load=load,
                offered_requests_per_s=rate,
                requests=n,
                requests_per_s=n / res.span,
                items_per_s=n * shape.items_per_request / res.span,
                tokens_per_s=n * shape.items_per_request * shape.tokens_per_item / res.span,
                p50=float(np.percentile(res.latency, 50)),
                p99=float(np.percentile(res.latency, 99)),
                ttft_p50=float(np.percentile(res.ttft, 50)),
                ttft_p99=float(np.percentile(res.ttft, 99)),
                sim_p50=float(np.percentile(sim_lat, 50)),
                sim_p99=float(np.percentile(sim_lat, 99)),
            )
        )
    return Measurement(saturation, rows, cost, quality)


def _at_once(items: Sequence[SimRequest]) -> list[SimRequest]:
    return [SimRequest(r.rid, 0.0, r.prompt, r.output_len, group=r.group) for r in items]


def _fresh_scheduler(engine: AsyncEngine) -> Callable[[], Any]:
    """A factory for new instances of the engine's scheduler (schedulers keep state)."""
    factory = engine.plugins.schedulers.get(engine.config.scheduler)
    options = engine.config.scheduler_options
    return lambda: factory(**options)
