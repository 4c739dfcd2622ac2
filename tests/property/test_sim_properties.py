"""Properties of whole simulated runs, for every built-in scheduler.

Small random workloads: 1-3 clients, token ids from a tiny alphabet on top of a few shared
prefixes (so prefixes collide and split the radix tree), a KV pool barely larger than the
largest request (so eviction and preemption happen), tiny batch and chunk budgets (so prefill is
chunked and admission breaks on misfits). Every run uses ``check=True``: after each step the
core's KV accounting and the radix invariants are recomputed, and every running request's
locked prefix must still be in the tree with its slots (locked nodes are never evicted).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmserve.interfaces import Scheduler
from slmserve.schedulers.dlpm import DLPM
from slmserve.schedulers.fcfs import FCFS
from slmserve.schedulers.klpm import KLPM
from slmserve.schedulers.lpm import LPM
from slmserve.schedulers.vtc import VTC
from slmserve.sim import CostModel, SimConfig, SimRequest, SimResult, simulate

SCHEDULERS: dict[str, Callable[[], Scheduler]] = {
    "fcfs": FCFS,
    "lpm": LPM,
    "lpm-ideal": lambda: LPM(mode="ideal"),
    "lpm-fallback-2": lambda: LPM(fallback_queue_len=2, in_batch_threshold=2, check_threshold=2),
    "klpm-1": lambda: KLPM(k=1),
    "klpm-3": lambda: KLPM(k=3),
    "vtc": VTC,
    "vtc-computed": lambda: VTC(input_charge="computed", weights={"c1": 2.0}),
    "dlpm-small-q": lambda: DLPM(quantum=8),
    "dlpm-inf": lambda: DLPM(quantum=math.inf),
}

PREFIXES = [(), (1, 2, 3, 4, 5, 6), (1, 2, 3, 9), (7, 7, 7, 7, 7, 7, 7, 7), (2, 1)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[SimRequest], SimConfig, CostModel]:
    n = draw(st.integers(1, 24))
    clients = draw(st.integers(1, 3))
    reqs = []
    for i in range(n):
        prefix = draw(st.sampled_from(PREFIXES))
        suffix = draw(st.lists(st.integers(1, 3), min_size=0 if prefix else 1, max_size=8))
        reqs.append(
            SimRequest(
                rid=f"r{i}",
                arrival=draw(st.integers(0, 40)) / 10,  # ties are common
                prompt=np.array([*prefix, *suffix], np.int64),
                output_len=draw(st.integers(1, 6)),
                client=f"c{draw(st.integers(0, clients - 1))}",
            )
        )
    # Each request fits an idle engine (and a little more, drawn below).
    need = max(len(r.prompt) + r.output_len for r in reqs)
    config = SimConfig(
        kv_tokens=need + draw(st.integers(0, 16)),
        max_batch_tokens=draw(st.integers(1, 24)),
        chunked_prefill_size=draw(st.integers(1, 12)),
        max_running_requests=draw(st.integers(1, 6)),
        max_steps=20_000,
    )
    cost = draw(
        st.sampled_from(
            [
                CostModel(),
                CostModel(step_overhead=0.05, prefill_token=0.01, decode_step=0.02),
            ]
        )
    )
    return reqs, config, cost


def run(name: str, scenario: tuple[list[SimRequest], SimConfig, CostModel]) -> SimResult:
    reqs, config, cost = scenario
    return simulate(reqs, SCHEDULERS[name](), config, cost, check=True, trace=True)


SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EACH = pytest.mark.parametrize("name", sorted(SCHEDULERS))


@EACH
@SETTINGS
@given(scenario=scenarios())
def test_conservation_and_causality(name: str, scenario) -> None:
    reqs = scenario[0]
    result = run(name, scenario)
    recs = {r.rid: r for r in result.records}
    assert sorted(recs) == sorted(r.rid for r in reqs)
    # Every request is admitted once plus once per preemption, and finishes exactly once.
    finished = [rid for _, _, _, done in result.trace for rid in done]
    assert sorted(finished) == sorted(recs)
    admitted = [rid for _, adm, _, _ in result.trace for rid in adm]
    preempted = [rid for _, _, pre, _ in result.trace for rid in pre]
    for req in reqs:
        rec = recs[req.rid]
        assert admitted.count(req.rid) == rec.admissions == rec.preemptions + 1
        assert preempted.count(req.rid) == rec.preemptions
        assert rec.output_tokens == req.output_len
        # Causality; a token exists only once the step that produced it has run.
        assert rec.first_scheduled is not None and rec.first_token is not None
        assert rec.finish is not None
        assert req.arrival == rec.arrival <= rec.first_scheduled < rec.first_token <= rec.finish
        assert 0 <= rec.cached_tokens <= rec.prompt_tokens - 1
    assert result.num_preemptions == len(preempted)
    assert 0 <= result.prefix_hits <= result.prefix_queries
    # Every token the engine computed is accounted to a client, per step.
    assert int(result.steps.output.sum()) == sum(r.output_len for r in reqs)
    assert int(result.steps.prompt.sum()) == result.prompt_tokens_computed


@EACH
@SETTINGS
@given(scenario=scenarios())
def test_work_conservation(name: str, scenario) -> None:
    """Never idle while something waits: an idle engine admits, and time only jumps ahead when
    every request that has arrived has finished."""
    result = run(name, scenario)
    steps = result.steps
    idle_and_waiting = (steps.running == 0) & (steps.waiting > 0)
    assert (steps.admitted[idle_and_waiting] >= 1).all()
    arrivals = np.array([r.arrival for r in result.records])
    finishes = np.array([r.finish for r in result.records], np.float64)
    assert steps.start[0] == arrivals.min()
    for k in np.flatnonzero(steps.start[1:] > steps.end[:-1]):
        gap_start, gap_end = steps.end[k], steps.start[k + 1]
        in_system = (arrivals < gap_end) & (finishes > gap_start)
        assert not in_system.any(), f"idle over ({gap_start}, {gap_end}) with work waiting"
        assert gap_end in arrivals  # the engine woke for an arrival
    # Steps never overlap and each takes time.
    assert (steps.end > steps.start).all()
    assert (steps.start[1:] >= steps.end[:-1]).all()


@EACH
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_deterministic(name: str, scenario) -> None:
    a, b = run(name, scenario), run(name, scenario)
    assert a.trace == b.trace
    assert a.records == b.records
    assert np.array_equal(a.steps.end, b.steps.end)
    assert np.array_equal(a.steps.prompt, b.steps.prompt)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_fcfs_first_admissions_follow_arrival_order(scenario) -> None:
    """Under FCFS no request is admitted for the first time before an older one."""
    result = run("fcfs", scenario)
    first = sorted(result.records, key=lambda r: (r.first_scheduled, r.admissions))
    seen: list[tuple[float, str]] = []
    for _, admitted, _, _ in result.trace:
        for rid in admitted:
            rec = next(r for r in first if r.rid == rid)
            key = (rec.arrival, rid)
            if key not in seen:
                seen.append(key)
    assert seen == sorted(seen)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_klpm_with_k_1_is_fcfs_and_dlpm_inf_is_ideal_lpm(scenario) -> None:
    assert run("klpm-1", scenario).trace == run("fcfs", scenario).trace
    assert run("dlpm-inf", scenario).trace == run("lpm-ideal", scenario).trace
