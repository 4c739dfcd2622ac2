"""``EngineCore.plan_step(busy=...)``: planning the next step while a closed one is in flight."""

from __future__ import annotations

import numpy as np

from slmserve.cache.kv_pool import SlotAllocator
from slmserve.engine.core import CoreLimits, EngineCore
from slmserve.engine.sequence import Sequence
from slmserve.schedulers.fcfs import FCFS
from slmserve.types import SamplingParams


def _core(num_slots: int, max_batch_tokens: int = 64) -> EngineCore:
    limits = CoreLimits(
        max_batch_tokens=max_batch_tokens,
        chunked_prefill_size=max_batch_tokens,
        max_running_requests=64,
        max_model_len=num_slots,
    )
    return EngineCore(SlotAllocator(num_slots), FCFS(), limits)


def _add(core: EngineCore, rid: str, ids: list[int], *, scoring: bool = True) -> Sequence:
    seq = Sequence(
        rid,
        ids,
        SamplingParams(max_tokens=1 if scoring else 4),
        arrival_time=0.0,
        client_id="c",
        eos_ids=frozenset(),
        label_ids=(1, 2) if scoring else None,
    )
    core.add(seq, 0.0)
    return seq


def test_a_busy_step_is_left_alone_and_needs_no_reserve() -> None:
    core = _core(num_slots=100, max_batch_tokens=40)
    for i in range(3):
        _add(core, f"s{i}", list(range(10 + 20 * i, 30 + 20 * i)))  # 20 tokens each
    first = core.plan_step(0.0)
    assert [it.seq.rid for it in first.items] == ["s0", "s1"] and first.closed
    # The third request's 20 tokens plus the 2 x 20 in flight fit 100 slots only because the
    # in-flight requests need nothing more: with them counted as still pending (their 20
    # tokens each reserved on top of the 40 just taken), it could not be admitted.
    busy = frozenset(it.seq.rid for it in first.items)
    second = core.plan_step(1.0, busy)
    assert [it.seq.rid for it in second.items] == ["s2"]
    assert not set(busy) & {it.seq.rid for it in second.items}
    # Slots of the two steps are disjoint: nothing in flight is handed out again.
    taken = np.concatenate([it.new_slots for it in first.items + second.items])
    assert len(np.unique(taken)) == len(taken) == 60
    core.complete_step(first, {})
    core.complete_step(second, {})
    core.check_integrity()


def test_without_busy_the_running_requests_would_be_planned_again() -> None:
    """The control for the test above: ``busy`` is what keeps in-flight requests out."""
    core = _core(num_slots=200, max_batch_tokens=40)
    _add(core, "long", list(range(10, 70)))  # 60 tokens: two chunks of 40 and 20
    first = core.plan_step(0.0)
    assert first.items[0].n == 40 and not first.items[0].sample
    again = core.plan_step(1.0)
    assert [it.seq.rid for it in again.items] == ["long"]  # planned twice: wrong if in flight
    core2 = _core(num_slots=200, max_batch_tokens=40)
    _add(core2, "long", list(range(10, 70)))
    plan = core2.plan_step(0.0)
    assert core2.plan_step(1.0, frozenset({"long"})).items == []
    core2.complete_step(plan, {})
    rest = core2.plan_step(2.0)
    assert rest.items[0].start == 40 and rest.items[0].n == 20 and rest.items[0].sample


def test_closed_means_every_request_is_scoring() -> None:
    core = _core(num_slots=200)
    _add(core, "score", [5, 6, 7])
    _add(core, "gen", [8, 9, 10], scoring=False)
    plan = core.plan_step(0.0)
    assert {it.seq.rid for it in plan.items} == {"score", "gen"}
    assert not plan.closed
    only_scoring = _core(num_slots=200)
    _add(only_scoring, "score", [5, 6, 7])
    assert only_scoring.plan_step(0.0).closed
