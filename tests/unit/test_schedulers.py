"""Hand-worked examples for the built-in schedulers: options, registration, and each rule.

The random, driver-based properties live in ``tests/property/test_schedulers.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from slmserve.interfaces import Scheduler
from slmserve.plugins import PluginManager, Registry
from slmserve.schedulers import dlpm, klpm, lpm, vtc
from slmserve.schedulers.dlpm import DLPM
from slmserve.schedulers.klpm import KLPM
from slmserve.schedulers.lpm import LPM
from slmserve.schedulers.vtc import VTC
from slmserve.types import SchedRequest, StepReport


def req(
    rid: str, arrival: float, *, client: str = "a", matched: int = 0, length: int = 10
) -> SchedRequest:
    r = SchedRequest(rid, list(range(length)), arrival_time=arrival, client_id=client)
    r.matched_len = matched
    return r


def rids(order: Sequence[SchedRequest]) -> list[str]:
    return [r.rid for r in order]


def step(
    sched: Scheduler,
    admitted: Sequence[SchedRequest] = (),
    *,
    running: Sequence[SchedRequest] = (),
    finished: Sequence[str] = (),
) -> None:
    """Report one step: admitted requests compute their uncached prompt and one token,
    ``running`` ones one token each."""
    computed = {r.rid: (r.client_id, r.prompt_len - r.matched_len, 1) for r in admitted}
    computed |= {r.rid: (r.client_id, 0, 1) for r in running}
    if admitted:
        sched.on_admit([r.rid for r in admitted], 0.0)  # when the engine plans the step
    sched.on_step(
        StepReport(
            now=0.0, admitted=[r.rid for r in admitted], computed=computed, finished=list(finished)
        )
    )


# ---------------------------------------------------------------------------- registration

FACTORIES = {"lpm": LPM, "klpm": KLPM, "vtc": VTC, "dlpm": DLPM}


def test_builtins_register_through_the_hook() -> None:
    pm = PluginManager(load_entrypoints=False)
    for name, factory in FACTORIES.items():
        assert pm.schedulers.get(name) is factory
        entry = next(e for e in pm.schedulers.entries() if e.name == name)
        assert entry.plugin == f"slmserve.schedulers.{name}" and entry.description
        assert isinstance(factory(), Scheduler)


def test_each_module_registers_exactly_its_policy() -> None:
    for module in (lpm, klpm, vtc, dlpm):
        registry: Registry = Registry("scheduler")
        module.slmserve_register_schedulers(registry=registry)
        assert registry.names() == [module.__name__.rsplit(".", 1)[1]]


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize("factory", FACTORIES.values())
def test_unknown_option_is_a_type_error_naming_it(factory: type[Scheduler]) -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        factory(no_such_option=1)


@pytest.mark.parametrize(
    ("factory", "options", "name"),
    [
        (LPM, {"mode": "greedy"}, "mode"),
        (LPM, {"fallback_queue_len": -1}, "fallback_queue_len"),
        (LPM, {"in_batch_threshold": "many"}, "in_batch_threshold"),
        (LPM, {"check_threshold": 1.5}, "check_threshold"),
        (KLPM, {"k": 0}, "k"),
        (KLPM, {"k": True}, "k"),
        (KLPM, {"match": "hit-rate"}, "match"),
        (VTC, {"input_price": -1}, "input_price"),
        (VTC, {"output_price": "free"}, "output_price"),
        (VTC, {"weights": {"a": 0}}, "weights"),
        (VTC, {"weights": "a=1"}, "weights"),
        (VTC, {"input_charge": "cached"}, "input_charge"),
        (DLPM, {"quantum": 0}, "quantum"),
        (DLPM, {"quantum": "nan"}, "quantum"),
        (DLPM, {"output_price": math.inf}, "output_price"),
    ],
)
def test_bad_option_value_is_a_value_error_naming_it(
    factory: type[Scheduler], options: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        factory(**options)


def test_options_from_the_command_line_are_parsed() -> None:
    assert KLPM(k="3").k == 3
    assert DLPM(quantum="inf").quantum == math.inf
    assert VTC(weights="a:1, b:2.5").weights == {"a": 1.0, "b": 2.5}
    assert LPM(fallback_queue_len="0").fallback_queue_len is None


def test_lpm_mode_sets_defaults_and_options_override_them() -> None:
    sglang, ideal = LPM(), LPM(mode="ideal")
    assert (sglang.fallback_queue_len, sglang.in_batch_threshold) == (128, 32)
    assert (ideal.fallback_queue_len, ideal.in_batch_threshold) == (None, None)
    assert LPM(mode="ideal", fallback_queue_len=64).fallback_queue_len == 64
    assert LPM(in_batch_threshold=None).in_batch_threshold is None


# ---------------------------------------------------------------------------- LPM


def test_lpm_orders_by_match_then_arrival_then_rid() -> None:
    waiting = [req("c", 2, matched=5), req("b", 1, matched=5), req("a", 1), req("d", 0, matched=9)]
    assert rids(LPM().order(waiting, 0.0)) == ["d", "b", "c", "a"]


def test_lpm_counts_fallback_rounds() -> None:
    sched = LPM(fallback_queue_len=2)
    waiting = [req("x", 1, matched=5), req("y", 0), req("z", 2)]
    assert rids(sched.order(waiting, 0.0)) == ["y", "x", "z"]
    assert rids(sched.order(waiting[:2], 0.0)) == ["x", "y"]
    assert sched.fallback_rounds == 1


def test_lpm_dedup_accepts_numpy_token_arrays() -> None:
    a = SchedRequest("a", np.arange(40), arrival_time=0.0)
    b = SchedRequest("b", [*range(40), 7], arrival_time=1.0)
    c = SchedRequest("c", [5, 5], arrival_time=2.0)
    assert rids(LPM().order([b, c, a], 0.0)) == ["a", "c", "b"]


# ---------------------------------------------------------------------------- k-LPM


def test_klpm_cycle_survives_a_failed_admission() -> None:
    sched = KLPM(k=2)
    old, warm, cold = req("old", 0), req("warm", 2, matched=8), req("cold", 1)
    assert rids(sched.order([warm, cold, old], 0.0)) == ["old", "warm", "cold"]
    step(sched, [old])  # "warm" did not fit: the LPM slot is still due
    assert sched.pos == 1
    assert rids(sched.order([warm, cold], 1.0)) == ["warm", "cold"]
    step(sched, [])  # nothing fitted: nothing consumed
    assert sched.pos == 1
    step(sched, [warm])
    assert sched.pos == 0
    assert rids(sched.order([cold, req("hot", 3, matched=9)], 2.0)) == ["cold", "hot"]


def test_klpm_ratio_key() -> None:
    short = req("short", 1, matched=4, length=5)  # 80 % cached
    long = req("long", 2, matched=8, length=40)  # 20 % cached
    first = req("first", 0)
    assert rids(KLPM(k=3).order([long, short, first], 0.0)) == ["first", "long", "short"]
    assert rids(KLPM(k=3, match="ratio").order([long, short, first], 0.0)) == [
        "first",
        "short",
        "long",
    ]


# ---------------------------------------------------------------------------- VTC


def test_vtc_order_reflects_counters_rising_within_the_round() -> None:
    sched = VTC()
    a1, a2, a3 = (req(f"a{i}", i, client="a") for i in range(3))
    b1 = req("b1", 0.5, client="b", length=30)
    for r in (a1, a2, a3, b1):
        sched.on_arrival(r, 0.0)
    sched.counters["b"] = 15.0
    # a's tentative counter goes 0 -> 10 -> 20; b (15) goes once a has passed it.
    assert rids(sched.order([b1, a3, a2, a1], 0.0)) == ["a0", "a1", "b1", "a2"]
    assert sched.counters == {"a": 0.0, "b": 15.0}  # order() charges nothing


def test_vtc_charges_full_input_at_admission_and_output_per_step() -> None:
    sched = VTC(weights={"b": 2})
    a, b = req("a", 0, client="a", matched=6), req("b", 0, client="b")
    sched.on_arrival(a, 0.0)
    sched.on_arrival(b, 0.0)
    a.tokens.append(99)  # the engine appends generated tokens to the same list
    step(sched, [a, b])
    assert sched.counters == {"a": 10 + 2, "b": (10 + 2) / 2}
    step(sched, running=[a, b])
    assert sched.counters == {"a": 14, "b": 7}
    assert sched.stats()["service_tokens"] == {"a": 14, "b": 14}


def test_vtc_computed_charge_counts_uncached_prompt_tokens() -> None:
    sched = VTC(input_charge="computed")
    a = req("a", 0, matched=6)
    sched.on_arrival(a, 0.0)
    step(sched, [a])
    assert sched.counters == {"a": 4 + 2}


def test_vtc_lifts_a_returning_client_to_the_least_backlogged_counter() -> None:
    sched = VTC()
    sched.on_arrival(req("a1", 0, client="a"), 0.0)
    sched.on_arrival(req("b1", 0, client="b"), 0.0)
    sched.counters |= {"a": 50.0, "b": 80.0}
    sched.on_arrival(req("c1", 1, client="c"), 1.0)  # new client: lifted to min(50, 80)
    assert sched.counters["c"] == 50.0
    sched.counters["c"] = 70.0
    sched.on_arrival(req("c2", 1, client="c"), 1.0)  # already backlogged: unchanged
    assert sched.counters["c"] == 70.0
    solo = VTC()
    solo.counters["z"] = 5.0
    solo.on_arrival(req("z1", 0, client="z"), 0.0)  # nobody else waiting: unchanged
    assert solo.counters["z"] == 5.0


def test_vtc_preempted_request_returns_without_double_charging() -> None:
    sched = VTC()
    r = req("r", 0)
    sched.on_arrival(r, 0.0)
    step(sched, [r])
    sched.on_arrival(r, 1.0)  # preempted: back in the queue, same object
    sched.on_step(StepReport(now=1.0, preempted=["r"]))
    assert sched.counters == {"a": 12}
    assert rids(sched.order([r], 1.0)) == ["r"]


def test_vtc_resyncs_with_the_engine_queue() -> None:
    sched = VTC()
    gone = req("gone", 0, client="a")
    sched.on_arrival(gone, 0.0)  # then aborted while waiting, never reported
    sched.counters["b"] = 40.0
    sched.order([req("b1", 0, client="b")], 0.0)
    sched.on_arrival(req("a2", 1, client="a"), 1.0)
    assert sched.counters["a"] == 40.0  # "a" was not backlogged any more: lifted


# ---------------------------------------------------------------------------- DLPM


def test_dlpm_spends_the_quantum_in_lpm_order_then_refills() -> None:
    sched = DLPM(quantum=10)
    warm = [req(f"w{i}", i, client="a", matched=6) for i in range(4)]  # cost 4 each
    cold = [req(f"c{i}", i + 0.5, client="b") for i in range(2)]  # cost 10 each
    for r in (*warm, *cold):
        sched.on_arrival(r, 0.0)
    assert sched.deficits == {"a": 10, "b": 10}
    # a: 10 -> 6 -> 2 -> -2 (exhausted) ; b: c0 (10 -> 0) ; refill +10: a 8, b 10 -> w3, c1.
    assert rids(sched.order([*cold, *warm], 0.0)) == ["w0", "w1", "w2", "c0", "w3", "c1"]
    step(sched, [warm[0], warm[1], warm[2], cold[0]])
    assert sched.deficits == {"a": 10 - 3 * (4 + 2), "b": 10 - (10 + 2)}
    assert sched.refills == 0
    sched.order([warm[3], cold[1]], 1.0)  # nobody eligible: one refill makes both positive
    assert (sched.deficits, sched.refills) == ({"a": 2, "b": 8}, 1)


def test_dlpm_drops_leftover_credit_but_keeps_debt() -> None:
    sched = DLPM(quantum=100)
    a, b = req("a", 0, client="a"), req("b", 0, client="b", length=60)
    sched.on_arrival(a, 0.0)
    sched.on_arrival(b, 0.0)
    step(sched, [a, b])
    assert sched.deficits == {"a": 0.0, "b": 0.0}  # 100 - 12 and 100 - 62, not banked
    sched.deficits["b"] = -30.0  # pretend b's running requests decoded a lot
    sched.on_arrival(req("a2", 1, client="a"), 1.0)
    sched.on_arrival(req("b2", 1, client="b"), 1.0)
    assert sched.deficits == {"a": 100.0, "b": 70.0}  # one quantum on activation, debt kept


def test_dlpm_infinite_quantum_never_blocks_a_newcomer() -> None:
    sched = DLPM(quantum=math.inf)
    first = req("first", 0, client="a", matched=3)
    sched.on_arrival(first, 0.0)
    step(sched, [first])
    late = req("late", 1, client="b", matched=9)
    sched.on_arrival(late, 1.0)
    sched.on_arrival(req("next", 1, client="a", matched=2), 1.0)
    assert rids(sched.order([req("next", 1, client="a", matched=2), late], 1.0))[0] == "late"
    assert sched.stats()["dlpm_deficit"] == {"a": math.inf, "b": math.inf}


def test_dlpm_refills_needed_is_the_fewest_quanta() -> None:
    assert dlpm.refills_needed([0.0], 10) == 1
    assert dlpm.refills_needed([-10.0, -35.0], 10) == 2
    assert dlpm.refills_needed([-9.5], 10) == 1


# ---------------------------------------------------------------------------- stats


@pytest.mark.parametrize("factory", FACTORIES.values())
def test_stats_are_per_client_copies(factory: type[Scheduler]) -> None:
    sched = factory()
    r = req("r", 0, client="x")
    sched.on_arrival(r, 0.0)
    sched.order([r], 0.0)
    step(sched, [r])
    stats = sched.stats()
    assert stats["prompt_tokens"] == {"x": 10} and stats["output_tokens"] == {"x": 1}
    stats["prompt_tokens"]["x"] = -1  # type: ignore[index]
    assert sched.stats()["prompt_tokens"] == {"x": 10}
