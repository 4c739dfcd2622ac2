"""``EngineCore.plan_step`` with steps in flight: each plan continues where the launched work
ends, and what is in flight is neither planned twice nor preempted."""

from __future__ import annotations

import numpy as np

from slmserve.cache.kv_pool import SlotAllocator
from slmserve.engine.core import CoreLimits, EngineCore, StepPlan
from slmserve.engine.sequence import Sequence, Status
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


def _add(
    core: EngineCore, rid: str, ids: list[int], *, scoring: bool = True, **params: float
) -> Sequence:
    seq = Sequence(
        rid,
        ids,
        SamplingParams(**{"max_tokens": 1 if scoring else 4, **params}),  # type: ignore[arg-type]
        arrival_time=0.0,
        client_id="c",
        eos_ids=frozenset(),
        label_ids=(1, 2) if scoring else None,
    )
    core.add(seq, 0.0)
    return seq


def test_scoring_in_flight_is_left_alone_and_needs_no_reserve() -> None:
    core = _core(num_slots=100, max_batch_tokens=40)
    for i in range(3):
        _add(core, f"s{i}", list(range(10 + 20 * i, 30 + 20 * i)))  # 20 tokens each
    first = core.plan_step(0.0)
    assert [it.seq.rid for it in first.items] == ["s0", "s1"] and first.closed
    # The third request's 20 tokens plus the 2 x 20 in flight fit 100 slots only because the
    # in-flight requests need nothing more: with them counted as still pending (their 20
    # tokens each reserved on top of the 40 just taken), it could not be admitted.
    second = core.plan_step(1.0)
    assert [it.seq.rid for it in second.items] == ["s2"]
    # Slots of the two steps are disjoint: nothing in flight is handed out again.
    taken = np.concatenate([it.new_slots for it in first.items + second.items])
    assert len(np.unique(taken)) == len(taken) == 60
    core.check_integrity()
    core.complete_step(first, {})
    core.complete_step(second, {})
    core.check_integrity()


def test_a_prompt_in_flight_continues_with_its_next_chunk_unless_held() -> None:
    core = _core(num_slots=200, max_batch_tokens=40)
    seq = _add(core, "long", list(range(10, 70)))  # 60 tokens: two chunks of 40 and 20
    first = core.plan_step(0.0)
    assert first.items[0].n == 40 and not first.items[0].sample
    assert core.plan_step(1.0, frozenset({"long"})).items == []
    (second,) = core.plan_step(1.0).items
    assert (second.start, second.n, second.sample, second.future) == (40, 20, True, False)
    assert np.array_equal(second.context[:40], first.items[0].new_slots)
    assert core.plan_step(2.0).items == []  # all of it in flight
    assert seq.num_computed == 0 and seq.num_scheduled == 60
    core.check_integrity()


def test_a_decode_reads_the_token_the_step_in_flight_samples() -> None:
    core = _core(num_slots=200)
    seq = _add(core, "gen", [5, 6, 7], scoring=False)  # max_tokens 4
    first = core.plan_step(0.0)
    assert not first.closed and first.items[0].sample and not first.items[0].future
    second = core.plan_step(1.0)
    (decode,) = second.items
    assert (decode.start, decode.n, decode.sample, decode.future) == (3, 1, True, True)
    assert np.array_equal(decode.context[:3], first.items[0].new_slots)
    # Two sampled tokens on the device; the second could be decoded by a third step.
    assert (seq.num_future, seq.num_pending) == (2, 1)
    core.complete_step(first, {"gen": 11})
    assert seq.tokens == [5, 6, 7, 11] and seq.num_computed == 3 and seq.in_flight
    third = core.plan_step(2.0)  # one more ahead, after the decode in flight
    assert (third.items[0].start, third.items[0].future) == (4, True)
    core.complete_step(second, {"gen": 12})
    core.complete_step(third, {"gen": 13})
    assert seq.output_ids == [11, 12, 13] and not seq.in_flight and seq.num_future == 0
    core.check_integrity()


def test_no_decode_ahead_of_a_token_that_ends_the_request_or_that_penalties_read() -> None:
    for params in ({"max_tokens": 1}, {"repetition_penalty": 1.2}, {"frequency_penalty": 0.5}):
        core = _core(num_slots=200)
        _add(core, "gen", [5, 6, 7], scoring=False, **params)
        core.plan_step(0.0)
        assert core.plan_step(1.0).items == [], params


def test_a_request_finished_with_its_next_decode_in_flight_frees_that_slot() -> None:
    core = _core(num_slots=50)
    seq = _add(core, "gen", [5, 6, 7], scoring=False)
    first = core.plan_step(0.0)
    second = core.plan_step(1.0)
    core.complete_step(first, {"gen": 0})
    core.finish(seq, "stop")  # e.g. the token was EOS
    core.check_integrity()
    assert core.allocator.num_free + core.cache.total_size == 50
    report = core.complete_step(second, {"gen": 9})  # collected later: ignored
    assert seq.output_ids == [0] and report.computed == {}
    core.check_integrity()


def test_memory_short_in_flight_requests_are_neither_planned_nor_preempted() -> None:
    core = _core(num_slots=40)
    _add(core, "a", [1, 2, 3, 4], scoring=False)
    _add(core, "b", [9, 8, 7], scoring=False)
    first = core.plan_step(0.0)
    core.allocator.alloc(core.allocator.num_free - 1)  # one slot left for two decodes
    ahead = core.plan_step(1.0)
    assert ahead.items == [] and ahead.preempted == []  # both wait for their step instead
    core.complete_step(first, {"a": 20, "b": 21})
    after = core.plan_step(2.0)  # nothing in flight: the newest gives way, as always
    assert [it.seq.rid for it in after.items] == ["a"] and after.preempted == ["b"]


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


def test_k_lpm_keeps_its_cycle_when_steps_are_planned_ahead() -> None:
    """The scheduler hears of admissions when a step is planned (``on_admit``), not when it is
    collected, so planning ahead cannot replay a cycle position: k-LPM with k=2 still
    alternates an LPM pick (a request whose prefix is cached) with an FCFS pick (the oldest)."""
    from collections import deque

    from slmserve.schedulers.klpm import KLPM

    def admissions(depth: int) -> list[str]:
        limits = CoreLimits(max_batch_tokens=10, chunked_prefill_size=10,
                            max_running_requests=64, max_model_len=1000)  # fmt: skip
        core = EngineCore(SlotAllocator(2000), KLPM(k=2), limits)
        warm = _add(core, "warm", [1] * 9 + [2])  # puts a 9-token prefix in the cache
        report = core.complete_step(core.plan_step(0.0), {})
        core.finish(warm, "stop")
        core.scheduler.on_step(report)
        for i in range(4):  # older, nothing cached; then newer, 9 tokens cached
            _add(core, f"cold{i}", [100 + i] * 10, scoring=False)
        for i in range(4):
            _add(core, f"hot{i}", [1] * 9 + [50 + i] * 10, scoring=False)
        order: list[str] = []
        inflight: deque[StepPlan] = deque()
        while core.has_work() or inflight:
            if len(inflight) < depth:
                plan = core.plan_step(1.0)
                if plan.items:
                    order += plan.admitted
                    inflight.append(plan)
                    continue
            plan = inflight.popleft()
            report = core.complete_step(plan, {it.seq.rid: 7 for it in plan.items if it.sample})
            for it in plan.items:
                seq = it.seq
                if it.sample and seq.status is Status.RUNNING and core.stop_reason(seq):
                    core.finish(seq, "length")
            report.finished = core.take_finished()
            core.scheduler.on_step(report)  # as the engine does, when the step is collected
        return order

    serial = admissions(1)
    assert serial[:4] == ["hot0", "cold0", "hot1", "cold1"]  # "warm" was the first FCFS pick
    assert admissions(2) == admissions(3) == serial
