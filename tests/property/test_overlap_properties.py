"""Planning ahead of the device (``EngineConfig.overlap``) changes no output and loses no slot.

The engine loop is replayed here against an emulated device: a KV pool of token ids that each
launched step writes in launch order, and a "model" whose next token is a hash of the whole
context it reads through the step's context slots. A request whose input token is still on
the device (``ScheduledSeq.future``) gets it from the device's own record of what the step
before sampled, as the runner does. With one or two steps in flight at planning time every
request must produce exactly the tokens of the one-step-at-a-time loop, every context must
read back the request's own tokens, and the slot accounting must hold after every step:
through chunked prefill, shared prefixes, EOS in the middle of a continued decode, eviction
and preemption.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmserve.cache.kv_pool import SlotAllocator
from slmserve.engine.core import CoreLimits, EngineCore, StepPlan
from slmserve.engine.sequence import Sequence, Status
from slmserve.schedulers.fcfs import FCFS
from slmserve.types import SamplingParams

VOCAB = 13
EOS = 0


def next_token(context: list[int]) -> int:
    """The emulated model: any change to the context (a wrong slot) changes the token."""
    h = 7
    for t in context:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
    return h % VOCAB


class Device:
    """Runs launched steps in launch order, as one CUDA stream does."""

    def __init__(self, num_slots: int) -> None:
        self.pool = np.full(num_slots, -1, np.int64)
        self.tokens: dict[str, list[int]] = {}  # each request's sequence as the device has it
        self.sampled: dict[str, int] = {}

    def launch(self, plan: StepPlan) -> dict[str, int]:
        out = {}
        for it in plan.items:
            rid = it.seq.rid
            if it.future:
                assert it.n == 1 and rid in self.sampled, "a future input nobody sampled"
                inputs = [self.sampled[rid]]
            else:
                inputs = it.seq.tokens[it.start : it.start + it.n]
            assert len(inputs) == it.n
            # The sequence so far: the host's tokens, then what the device sampled beyond them.
            host, have = it.seq.tokens, self.tokens.get(rid, [])
            assert have[: len(host)] == host[: len(have)], f"{rid}: host and device disagree"
            known = (have if len(have) > len(host) else host)[: it.start]
            assert len(known) == it.start
            self.tokens[rid] = known + inputs
            self.pool[it.new_slots] = inputs
            context = self.pool[it.context].tolist()
            assert len(context) == it.start + it.n
            assert context == self.tokens[rid], f"{rid} reads KV that is not its own"
            if it.sample:
                out[rid] = self.sampled[rid] = next_token(context)
        return out


def run(prompts: list[list[int]], max_tokens: list[int], depth: int, **limits: int) -> dict:
    num_slots = limits.pop("num_slots")
    core = EngineCore(
        SlotAllocator(num_slots),
        FCFS(),
        CoreLimits(max_model_len=10_000, max_running_requests=8, **limits),
    )
    seqs = []
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        seq = Sequence(
            f"r{i}",
            prompt,
            SamplingParams(max_tokens=m, temperature=0.0),
            arrival_time=float(i),
            client_id="c",
            eos_ids=frozenset({EOS}),
        )
        core.add(seq, float(i))
        seqs.append(seq)
    device = Device(num_slots)
    inflight: deque[tuple[StepPlan, dict[str, int]]] = deque()
    now = 0.0
    while core.has_work() or inflight:
        now += 1.0
        if len(inflight) < depth:
            plan = core.plan_step(now)
            if plan.items:
                inflight.append((plan, device.launch(plan)))
                continue
            assert inflight, "nothing could run although requests wait"
        plan, sampled = inflight.popleft()
        core.complete_step(plan, sampled, now)
        for it in plan.items:  # as AsyncEngine._emit does
            seq = it.seq
            if it.sample and seq.status is Status.RUNNING:
                reason = core.stop_reason(seq)
                if reason is not None:
                    core.finish(seq, reason)
        core.take_finished()
        core.check_integrity()
    assert core.cache.protected_size == 0
    assert core.allocator.num_free + core.cache.total_size == num_slots
    return {s.rid: (s.output_ids, s.finish_reason) for s in seqs}


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[list[int]], list[int], dict[str, int]]:
    shared = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=12))
    n = draw(st.integers(1, 7))
    prompts = []
    for _ in range(n):
        own = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=20))
        prompts.append(shared + own if draw(st.booleans()) else own)
    max_tokens = draw(st.lists(st.integers(1, 12), min_size=n, max_size=n))
    chunk = draw(st.integers(2, 24))
    longest = max(len(p) + m for p, m in zip(prompts, max_tokens))
    # From barely one request (eviction, preemption) to room for everything.
    num_slots = longest + draw(st.integers(2, 120))
    limits = {
        "num_slots": num_slots,
        "chunked_prefill_size": chunk,
        "max_batch_tokens": chunk + draw(st.integers(0, 24)),
    }
    return prompts, max_tokens, limits


@pytest.mark.parametrize("depth", [2, 3])
@settings(max_examples=200, deadline=None)
@given(work=workloads())
def test_planning_ahead_gives_the_same_tokens(
    work: tuple[list[list[int]], list[int], dict[str, int]], depth: int
) -> None:
    """Two steps in flight is the engine's rule for steps that generate; three (two sampled
    tokens of a request on the device at once) checks the core does not depend on it."""
    prompts, max_tokens, limits = work
    serial = run(prompts, max_tokens, depth=1, **limits)
    ahead = run(prompts, max_tokens, depth=depth, **limits)
    assert ahead == serial
    for (tokens, reason), m in zip(serial.values(), max_tokens):
        assert 1 <= len(tokens) <= m
        assert reason == ("length" if len(tokens) == m else "stop")
        assert reason == "length" or tokens[-1] == EOS


def test_the_overlapped_loop_does_decode_tokens_still_on_the_device() -> None:
    """The property above is not vacuous: planned ahead, most decodes read a future token,
    and an EOS met while the next decode is in flight discards that decode."""
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [7, 8], [4, 4, 4], [9, 3]]
    max_tokens = [12, 12, 12, 12, 12]
    limits = {"num_slots": 200, "chunked_prefill_size": 4, "max_batch_tokens": 8}
    futures = []
    launch = Device.launch

    def counting(self: Device, plan: StepPlan) -> dict[str, int]:
        futures.extend(it.future for it in plan.items)
        return launch(self, plan)

    Device.launch = counting  # type: ignore[method-assign]
    try:
        ahead = run(prompts, max_tokens, depth=2, **limits)
    finally:
        Device.launch = launch  # type: ignore[method-assign]
    assert ahead == run(prompts, max_tokens, depth=1, **limits)
    decodes = sum(len(tokens) - 1 for tokens, _ in ahead.values())
    assert sum(futures) >= decodes - len(prompts)
    assert any(reason == "stop" for _, reason in ahead.values())
