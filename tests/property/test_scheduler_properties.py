"""Property tests for the built-in schedulers, run through a tiny admission driver.

The driver is deliberately *not* a simulator: no time model, no KV memory. Each step it feeds
arrivals (``on_arrival``), refreshes ``matched_len`` from a toy prefix cache, calls ``order``,
admits in that order under a token budget and a running-request cap, **stopping at the first
request that does not fit** (the engine's break semantics), runs the step (admitted requests
compute their uncached prompt and one token, running ones one token), and reports it through
``on_step``. That is all the schedulers see in the engine, so the properties below are
properties of the shipped policies. The checks re-derive each policy's rule from the research
notes (``shared/research/schedulers.md`` section 8.2) rather than calling policy internals.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmserve.interfaces import Scheduler
from slmserve.schedulers.dlpm import DLPM
from slmserve.schedulers.fcfs import FCFS
from slmserve.schedulers.klpm import KLPM
from slmserve.schedulers.lpm import LPM
from slmserve.schedulers.vtc import VTC
from slmserve.types import SchedRequest, StepReport

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
EPS = 1e-6


def fkey(r: SchedRequest) -> tuple[float, str]:
    return (r.arrival_time, r.rid)


def lkey(r: SchedRequest) -> tuple[int, float, str]:
    return (-r.matched_len, r.arrival_time, r.rid)


# ============================================================================ workloads


@dataclass(frozen=True)
class Spec:
    """One request of a workload: who, what, when, how long."""

    rid: str
    client: str
    tokens: tuple[int, ...]
    step: int
    out_len: int


def random_workload(
    seed: int,
    *,
    n: int,
    clients: int,
    span: int,
    groups: int = 3,
    prefix_len: int = 8,
    max_out: int = 4,
) -> list[Spec]:
    """Prompts = one of a few shared prefixes + a short suffix over a tiny alphabet.

    The tiny alphabet makes accidental partial matches common, which is what the LPM keys
    must cope with.
    """
    rng = random.Random(seed)
    prefixes = [
        tuple(rng.randrange(3) for _ in range(rng.randint(0, prefix_len))) for _ in range(groups)
    ]
    specs = []
    for i in range(n):
        suffix = tuple(rng.randrange(4) for _ in range(rng.randint(1, 6)))
        specs.append(
            Spec(
                rid=f"r{i:04d}",
                client=f"c{rng.randrange(clients)}",
                tokens=rng.choice(prefixes) + suffix,
                step=rng.randint(0, span),
                out_len=rng.randint(1, max_out),
            )
        )
    return specs


@st.composite
def workloads(draw: st.DrawFn, max_n: int = 30, max_clients: int = 4) -> dict[str, Any]:
    """Workload plus engine shape; the content comes from a seed to keep examples cheap."""
    specs = random_workload(
        draw(st.integers(0, 2**32 - 1)),
        n=draw(st.integers(1, max_n)),
        clients=draw(st.integers(1, max_clients)),
        span=draw(st.integers(0, 12)),
    )
    longest = max(len(s.tokens) for s in specs)
    return {
        "specs": specs,
        "budget": longest + draw(st.integers(0, 30)),
        "max_running": draw(st.integers(1, 5)),
        "cache_prompts": draw(st.integers(1, 8)),
        "seed": draw(st.integers(0, 1000)),
    }


# ============================================================================ the driver


class ToyCache:
    """Whole prompts in LRU order, as a trie with reference counts; match = longest prefix."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.prompts: list[tuple[int, ...]] = []
        self.root: dict[int, list[Any]] = {}  # token -> [refcount, children]

    def match(self, tokens: Iterable[int]) -> int:
        node, n = self.root, 0
        for t in tokens:
            entry = node.get(t)
            if entry is None:
                break
            node, n = entry[1], n + 1
        return n

    def insert(self, tokens: tuple[int, ...]) -> None:
        if tokens in self.prompts:
            self.prompts.remove(tokens)
            self.prompts.append(tokens)
            return
        self.prompts.append(tokens)
        self._walk(tokens, +1)
        if len(self.prompts) > self.capacity:
            self._walk(self.prompts.pop(0), -1)

    def _walk(self, tokens: tuple[int, ...], delta: int) -> None:
        node = self.root
        for t in tokens:
            entry = node.setdefault(t, [0, {}])
            entry[0] += delta
            child = entry[1]
            if entry[0] == 0:
                del node[t]
            node = child


def snapshot(sched: Scheduler) -> dict[str, dict[str, float]]:
    return {k: dict(v) for k, v in sched.stats().items()}


@dataclass
class Round:
    """One engine step as the scheduler saw it."""

    step: int
    waiting: list[SchedRequest] = field(default_factory=list)
    matched: dict[str, int] = field(default_factory=dict)
    order: list[str] | None = None
    admitted: list[str] = field(default_factory=list)
    report: StepReport | None = None
    before_order: dict[str, dict[str, float]] = field(default_factory=dict)
    after_order: dict[str, dict[str, float]] = field(default_factory=dict)
    before_step: dict[str, dict[str, float]] = field(default_factory=dict)
    after_step: dict[str, dict[str, float]] = field(default_factory=dict)
    backlog: dict[str, int] = field(default_factory=dict)
    """Waiting requests per client at the end of the step."""


@dataclass
class Arrival:
    rid: str
    client: str
    waiting_clients: set[str]
    """Clients with waiting requests just before this arrival (the driver's truth)."""
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]


@dataclass
class Trace:
    specs: dict[str, Spec]
    rounds: list[Round] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    admissions: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)


def drive(
    sched: Scheduler,
    specs: list[Spec],
    *,
    budget: int,
    max_running: int,
    cache_prompts: int = 8,
    seed: int = 0,
    preempt_prob: float = 0.0,
    snapshots: bool = True,
    refresh: bool = True,
    steps: int | None = None,
    max_steps: int = 10_000,
) -> Trace:
    """Run ``sched`` over ``specs`` until every request finished (or for ``steps`` steps)."""
    rng = random.Random(seed)
    trace = Trace({s.rid: s for s in specs})
    cache = ToyCache(cache_prompts)
    pending = sorted(specs, key=lambda s: (s.step, s.rid))
    next_arrival = 0
    waiting: dict[str, SchedRequest] = {}
    running: dict[str, list[Any]] = {}  # rid -> [request, tokens produced]
    snap = snapshot if snapshots else (lambda s: {})
    for step in range(max_steps):
        if step == steps or (next_arrival == len(pending) and not waiting and not running):
            return trace
        now = float(step)
        rnd = Round(step)
        while next_arrival < len(pending) and pending[next_arrival].step <= step:
            s = pending[next_arrival]
            next_arrival += 1
            r = SchedRequest(
                s.rid, s.tokens, arrival_time=now, client_id=s.client, max_new_tokens=s.out_len
            )
            clients = {w.client_id for w in waiting.values()}
            before = snap(sched)
            sched.on_arrival(r, now)
            trace.arrivals.append(Arrival(s.rid, s.client, clients, before, snap(sched)))
            waiting[s.rid] = r
        preempted = []
        if running and rng.random() < preempt_prob:  # the newest running request, as vLLM
            rid = next(reversed(running))
            r = running.pop(rid)[0]
            preempted.append(rid)
            waiting[rid] = r
            sched.on_arrival(r, now)
        admitted: list[str] = []
        if waiting and not preempted:
            for r in waiting.values():
                if refresh:
                    r.matched_len = min(cache.match(r.tokens), r.prompt_len - 1)
            view = list(waiting.values())
            rng.shuffle(view)  # the policy must not depend on the queue's order
            rnd.waiting = sorted(view, key=attrgetter("arrival_time", "rid"))
            rnd.matched = {r.rid: r.matched_len for r in view}
            rnd.before_order = snap(sched)
            order = sched.order(view, now)
            rnd.after_order = snap(sched)
            rnd.order = [r.rid for r in order]
            assert sorted(rnd.order) == sorted(waiting), "order() must permute the queue"
            used = 0
            for r in order:
                cost = r.prompt_len - r.matched_len
                if len(running) >= max_running or used + cost > budget:
                    break  # break semantics: the first misfit ends admission
                used += cost
                admitted.append(r.rid)
                running[r.rid] = [waiting.pop(r.rid), 0]
            if admitted:
                sched.on_admit(admitted, now)  # when the engine plans the step
        computed = {}
        for rid, state in running.items():
            r = state[0]
            prompt = r.prompt_len - r.matched_len if rid in admitted else 0
            state[1] += 1
            computed[rid] = (r.client_id, prompt, 1)
        for rid in admitted:
            cache.insert(tuple(running[rid][0].tokens))
        finished = [rid for rid, (r, made) in running.items() if made >= r.max_new_tokens]
        for rid in finished:
            del running[rid]
        report = StepReport(
            now=now, admitted=admitted, computed=computed, finished=finished, preempted=preempted
        )
        rnd.admitted, rnd.report = admitted, report
        rnd.before_step = snap(sched)
        sched.on_step(report)
        rnd.after_step = snap(sched)
        rnd.backlog = dict(Counter(r.client_id for r in waiting.values()))
        trace.rounds.append(rnd)
        trace.admissions += admitted
        trace.finished += finished
    raise AssertionError(f"workload did not drain in {max_steps} steps")


def run(make: Callable[[], Scheduler], w: dict[str, Any], **kw: Any) -> Trace:
    params = {k: w[k] for k in ("budget", "max_running", "cache_prompts", "seed")}
    return drive(make(), w["specs"], **params, **kw)


def check_conservation(trace: Trace, *, preemption: bool = False) -> None:
    assert sorted(trace.finished) == sorted(trace.specs)
    if not preemption:
        assert sorted(trace.admissions) == sorted(trace.specs)
    else:
        assert set(trace.admissions) == set(trace.specs)


# ============================================================================ all policies

POLICIES: dict[str, Callable[[], Scheduler]] = {
    "fcfs": FCFS,
    "lpm": LPM,
    "lpm-ideal": lambda: LPM(mode="ideal"),
    "lpm-small-thresholds": lambda: LPM(
        fallback_queue_len=6, in_batch_threshold=3, check_threshold=2
    ),
    "klpm": lambda: KLPM(k=3),
    "vtc": VTC,
    "vtc-computed": lambda: VTC(input_charge="computed"),
    "dlpm": lambda: DLPM(quantum=12),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=15, deadline=None, derandomize=True)
@given(w=workloads(), preempt=st.sampled_from([0.0, 0.2]))
def test_every_policy_conserves_requests_and_is_deterministic(
    name: str, w: dict[str, Any], preempt: float
) -> None:
    """No loss or duplication; the schedule does not depend on the order of the queue."""
    a = run(POLICIES[name], w, preempt_prob=preempt, snapshots=False)
    check_conservation(a, preemption=preempt > 0)
    if preempt == 0:
        b = run(POLICIES[name], {**w, "seed": w["seed"] + 1}, snapshots=False)
        assert a.admissions == b.admissions


# ============================================================================ FCFS


@SETTINGS
@given(w=workloads())
def test_fcfs_admits_in_arrival_order(w: dict[str, Any]) -> None:
    trace = run(FCFS, w)
    keys = [(trace.specs[rid].step, rid) for rid in trace.admissions]
    assert keys == sorted(keys)


# ============================================================================ LPM


def requests_from(
    seed: int, n: int, *, alphabet: int = 3, prefix_len: int = 6
) -> list[SchedRequest]:
    """Random waiting requests with random (not necessarily consistent) matched lengths."""
    rng = random.Random(seed)
    prefixes = [tuple(rng.randrange(alphabet) for _ in range(prefix_len)) for _ in range(3)]
    out = []
    for i in range(n):
        tokens = rng.choice(prefixes)[: rng.randint(0, prefix_len)]
        tokens += tuple(rng.randrange(alphabet) for _ in range(rng.randint(1, 5)))
        r = SchedRequest(
            f"q{rng.randrange(10**6):06d}-{i}",
            tokens,
            arrival_time=float(rng.randint(0, 5)),
            client_id=f"c{rng.randrange(3)}",
        )
        r.matched_len = rng.randint(0, len(tokens) - 1)
        out.append(r)
    return out


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40))
def test_ideal_lpm_sorts_by_match_then_arrival(seed: int, n: int) -> None:
    waiting = requests_from(seed, n)
    got = LPM(mode="ideal").order(waiting, 0.0)
    assert [r.rid for r in got] == [r.rid for r in sorted(waiting, key=lkey)]


@SETTINGS
@given(w=workloads())
def test_lpm_admits_longest_match_first_within_each_round(w: dict[str, Any]) -> None:
    trace = run(lambda: LPM(mode="ideal"), w)
    for rnd in trace.rounds:
        matched = [rnd.matched[rid] for rid in rnd.admitted]
        assert matched == sorted(matched, reverse=True)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 20), limit=st.integers(1, 12))
def test_sglang_lpm_is_fcfs_above_the_queue_limit(seed: int, n: int, limit: int) -> None:
    waiting = requests_from(seed, n)
    got = [r.rid for r in LPM(fallback_queue_len=limit, in_batch_threshold=None).order(waiting, 0)]
    expect_key = fkey if n > limit else lkey
    assert got == [r.rid for r in sorted(waiting, key=expect_key)]


def test_sglang_lpm_default_fallback_is_128() -> None:
    waiting = requests_from(7, 129, alphabet=50)
    assert LPM().order(waiting, 0) == sorted(waiting, key=fkey)
    assert LPM().order(waiting[:128], 0) != sorted(waiting[:128], key=fkey)


def sglang_reference(waiting: list[SchedRequest], check: int, threshold: int) -> list[str]:
    """SGLang's loop, a list standing in for its throw-away radix tree, visited in LPM order."""

    def shared(a: tuple[int, ...], b: tuple[int, ...]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    ranked = sorted(waiting, key=lkey)
    tree: list[tuple[int, ...]] = []
    moved = set()
    for r in ranked:
        if r.matched_len <= check:
            if max((shared(tuple(r.tokens), t) for t in tree), default=0) >= threshold:
                moved.add(r.rid)
            else:
                tree.append(tuple(r.tokens))
    return [r.rid for r in ranked if r.rid not in moved] + [r.rid for r in ranked if r.rid in moved]


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 30),
    check=st.integers(0, 4),
    threshold=st.integers(1, 6),
)
def test_in_batch_deprioritisation_matches_sglangs_loop(
    seed: int, n: int, check: int, threshold: int
) -> None:
    waiting = requests_from(seed, n, alphabet=2)
    sched = LPM(in_batch_threshold=threshold, check_threshold=check)
    got = [r.rid for r in sched.order(waiting, 0.0)]
    assert got == sglang_reference(waiting, check, threshold)


def test_in_batch_deprioritisation_with_sglang_defaults() -> None:
    system = tuple(range(100, 140))  # a 40-token prompt nobody has cached yet
    a = SchedRequest("a", (*system, 1), arrival_time=0.0)
    b = SchedRequest("b", (*system, 2), arrival_time=1.0)
    c = SchedRequest("c", (7, 8, 9), arrival_time=2.0)
    d = SchedRequest("d", (*system[:31], 5, 5), arrival_time=3.0)  # shares only 31 tokens
    order = [r.rid for r in LPM().order([d, c, b, a], 0.0)]
    assert order == ["a", "c", "d", "b"]
    for r in (a, b):
        r.matched_len = 40  # once a's prompt is cached, b matches it and is not checked
    assert [r.rid for r in LPM().order([d, c, b, a], 0.0)][:2] == ["a", "b"]


# ============================================================================ k-LPM


def overtaking_violations(trace: Trace, k: int) -> list[tuple[str, int, int]]:
    """Requests admitted later than ``k * (p + 1)`` admissions after a moment with ``p`` older.

    A "moment" is just before each admission (and each round start). Returns
    ``(rid, deadline, actual admission index)`` for every violation.
    """
    index = {rid: i for i, rid in enumerate(trace.admissions)}
    violations = []
    a = 0
    for rnd in trace.rounds:
        remaining = list(rnd.waiting)  # sorted by (arrival, rid)
        for j in range(len(rnd.admitted) + 1):
            for p, r in enumerate(remaining):
                deadline = a + k * (p + 1) - 1
                if index[r.rid] > deadline:
                    violations.append((r.rid, deadline, index[r.rid]))
            if j < len(rnd.admitted):
                remaining = [r for r in remaining if r.rid != rnd.admitted[j]]
                a += 1
    return violations


@SETTINGS
@given(w=workloads())
def test_klpm_with_k_1_is_fcfs(w: dict[str, Any]) -> None:
    assert run(lambda: KLPM(k=1), w).admissions == run(FCFS, w).admissions


@SETTINGS
@given(w=workloads(), k=st.integers(2, 5))
def test_klpm_cycle_persists_and_advances_only_on_admission(w: dict[str, Any], k: int) -> None:
    """Admission number ``a`` (over the whole run) is an FCFS pick iff ``a % k == 0``.

    The cycle position is therefore carried across steps, and a request that did not fit (the
    driver's break) does not use up its slot. The whole returned order follows the cycle too.
    """
    trace = run(lambda: KLPM(k=k), w)
    a = 0
    for rnd in trace.rounds:
        remaining = list(rnd.waiting)
        for j, rid in enumerate(rnd.order or []):
            by = fkey if (a + j) % k == 0 else (lambda r, m=rnd.matched: (-m[r.rid], *fkey(r)))
            best = min(remaining, key=by)
            assert rid == best.rid, (a + j, rid, best.rid)
            remaining.remove(best)
        a += len(rnd.admitted)


@SETTINGS
@given(w=workloads(max_n=40), k=st.integers(1, 5))
def test_klpm_bounded_overtaking(w: dict[str, Any], k: int) -> None:
    trace = run(lambda: KLPM(k=k), w, snapshots=False)
    assert overtaking_violations(trace, k) == []


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), extra=st.integers(0, 5))
def test_klpm_with_k_above_queue_is_one_fcfs_pick_then_lpm(seed: int, n: int, extra: int) -> None:
    waiting = requests_from(seed, n)
    got = KLPM(k=n + 1 + extra).order(waiting, 0.0)
    oldest = min(waiting, key=fkey)
    assert got[0] is oldest
    assert got[1:] == sorted((r for r in waiting if r is not oldest), key=lkey)


def warm_stream(length: int) -> list[Spec]:
    """One cold request, then a warm request every step that shares a long cached prefix."""
    system = tuple(range(10, 30))
    specs = [Spec("cold", "c1", (99, 98, 97), 1, 1)]  # arrives once the prefix is cached
    specs += [Spec(f"w{i:04d}", "c0", (*system, i % 7), i, 1) for i in range(length)]
    return specs


@pytest.mark.parametrize("length", [10, 40])
def test_lpm_starves_a_cold_request_and_klpm_does_not(length: int) -> None:
    """The starvation witness of the notes: the checker above is able to fail."""
    kw = {"budget": 64, "max_running": 1, "snapshots": False}
    lpm = drive(LPM(mode="ideal"), warm_stream(length), **kw)
    assert lpm.admissions.index("cold") >= length - 1  # waits for the whole stream
    assert overtaking_violations(lpm, k=2)
    klpm = drive(KLPM(k=2), warm_stream(length), **kw)
    assert klpm.admissions.index("cold") <= 2
    assert overtaking_violations(klpm, k=2) == []


# ============================================================================ VTC


def vtc_cost(trace: Trace, rnd: Round, sched: VTC) -> dict[str, float]:
    """Service charged in one step, VTC-style: full input at admission, output per token."""
    cost: Counter[str] = Counter()
    assert rnd.report is not None
    for rid in rnd.admitted:
        cost[trace.specs[rid].client] += sched.input_price * len(trace.specs[rid].tokens)
    for client, _, out in rnd.report.computed.values():
        cost[client] += sched.output_price * out
    return cost


@SETTINGS
@given(w=workloads(), weights=st.sampled_from([None, {"c0": 2.0, "c2": 0.5}]))
def test_vtc_counters(w: dict[str, Any], weights: dict[str, float] | None) -> None:
    """Least-counter order, per-step charges, the lift rule, and counters never decreasing."""
    sched = VTC(weights=weights)
    trace = drive(sched, w["specs"], **{k: w[k] for k in ("budget", "max_running", "seed")})
    weight = (weights or {}).get

    def counters(snap: dict[str, dict[str, float]]) -> dict[str, float]:
        return snap.get("vtc_counter", {})

    for ev in trace.arrivals:  # lift: only when the client's queue was empty
        before, after = counters(ev.before), counters(ev.after)
        own = before.get(ev.client, 0.0)
        others = [before.get(c, 0.0) for c in ev.waiting_clients if c != ev.client]
        if ev.client in ev.waiting_clients:
            assert after.get(ev.client) == own
        else:
            assert after[ev.client] == (max(own, min(others)) if others else own)
        assert {c: v for c, v in after.items() if c != ev.client} == {
            c: v for c, v in before.items() if c != ev.client
        }
    last: dict[str, float] = {}
    for rnd in trace.rounds:
        for snap in (rnd.before_order, rnd.after_order, rnd.before_step, rnd.after_step):
            for c, v in counters(snap).items():
                assert v >= last.get(c, 0.0) - EPS
                last[c] = v
        if rnd.order is not None:  # the whole order is least-tentative-counter, FIFO per client
            tentative = dict(counters(rnd.after_order))
            remaining = list(rnd.waiting)
            for rid in rnd.order:
                heads: dict[str, SchedRequest] = {}
                for r in remaining:
                    heads.setdefault(r.client_id, r)
                best = min(
                    heads.values(), key=lambda r, t=tentative: (t.get(r.client_id, 0.0), *fkey(r))
                )
                assert rid == best.rid
                remaining.remove(best)
                tentative[best.client_id] = tentative.get(best.client_id, 0.0) + (
                    len(best.tokens) / (weight(best.client_id) or 1.0)
                )
        charged = vtc_cost(trace, rnd, sched)
        before, after = counters(rnd.before_step), counters(rnd.after_step)
        for c in set(before) | set(after):
            delta = after.get(c, 0.0) - before.get(c, 0.0)
            assert math.isclose(delta, charged.get(c, 0.0) / (weight(c) or 1.0), abs_tol=EPS)


def service_gaps(
    trace: Trace,
    charge: Callable[[Round], dict[str, float]],
    weights: dict[str, float] | None = None,
) -> list[float]:
    """Per step, while every client still has waiting requests: max - min weighted service."""
    clients = sorted({s.client for s in trace.specs.values()})
    total = dict.fromkeys(clients, 0.0)
    gaps = []
    for rnd in trace.rounds:
        for c, x in charge(rnd).items():
            total[c] += x / ((weights or {}).get(c) or 1.0)
        if any(rnd.backlog.get(c, 0) == 0 for c in clients):
            break
        gaps.append(max(total.values()) - min(total.values()))
    return gaps


def overload(seed: int, *, steps: int, rates: tuple[int, ...], max_out: int) -> list[Spec]:
    """Client ``i`` sends ``rates[i]`` requests every step (prompts of 2-10 tokens)."""
    rng = random.Random(seed)
    specs = []
    for step in range(steps):
        for c, rate in enumerate(rates):
            for _ in range(rate):
                tokens = tuple(rng.randrange(50) for _ in range(rng.randint(2, 10)))
                rid = f"r{len(specs):05d}"
                specs.append(Spec(rid, f"c{c}", tokens, step, rng.randint(1, max_out)))
    return specs


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    rates=st.sampled_from([(2, 1), (3, 1), (1, 1, 2)]),
    max_running=st.integers(1, 3),
    max_out=st.integers(1, 5),
)
def test_vtc_service_gap_is_bounded_and_does_not_grow(
    seed: int, rates: tuple[int, ...], max_running: int, max_out: int
) -> None:
    """|W_f - W_g| <= 2 max(w_p L_in, w_q M) while all are backlogged, for short and long runs.

    Every client alone sends more requests per step than the engine can admit
    (``max_running``), so all stay backlogged. ``M``, the most output tokens the engine can
    owe, is ``max_running * max_out``. FCFS on the same workload breaks the bound: the check
    can fail.
    """
    bound = 2 * max(1 * 10, 2 * max_running * max_out)
    kw = {"budget": 30, "max_running": max_running, "snapshots": False, "refresh": False}
    rates = tuple(r * (max_running + 1) for r in rates)
    for steps in (15, 60):
        specs = overload(seed, steps=steps, rates=rates, max_out=max_out)
        sched = VTC()
        trace = drive(sched, specs, steps=steps, **kw)
        gaps = service_gaps(trace, lambda rnd, t=trace, s=sched: vtc_cost(t, rnd, s))
        assert len(gaps) == steps  # backlogged together throughout
        assert max(gaps) <= bound
    fcfs = drive(FCFS(), specs, steps=steps, **kw)
    assert max(service_gaps(fcfs, lambda rnd: vtc_cost(fcfs, rnd, sched))) > bound


def test_vtc_weights_share_service_in_proportion() -> None:
    specs = overload(3, steps=100, rates=(3, 3), max_out=3)
    sched = VTC(weights={"c1": 2})
    kw = {"budget": 30, "max_running": 2, "steps": 100, "snapshots": False, "refresh": False}
    trace = drive(sched, specs, **kw)
    weights = {"c0": 1.0, "c1": 2.0}
    gaps = service_gaps(trace, lambda rnd: vtc_cost(trace, rnd, sched), weights)
    assert len(gaps) == 100 and max(gaps) <= 2 * max(10, 2 * 2 * 3)
    service = sched.stats()["service_tokens"]
    assert 1.8 < service["c1"] / service["c0"] < 2.2


# ============================================================================ DLPM


def dlpm_cost(rnd: Round, sched: DLPM) -> dict[str, float]:
    cost: Counter[str] = Counter()
    assert rnd.report is not None
    for client, prompt, out in rnd.report.computed.values():
        cost[client] += sched.input_price * prompt + sched.output_price * out
    return cost


@SETTINGS
@given(w=workloads(), quantum=st.sampled_from([1.0, 5.0, 12.0, 40.0]))
def test_dlpm_deficits_refills_and_order(w: dict[str, Any], quantum: float) -> None:
    """q <= Q; charges per step; activation, no banking; refills only when nobody is eligible;
    the order is LPM among clients with a positive (tentative) deficit."""
    sched = DLPM(quantum=quantum)
    trace = run(lambda: sched, w)

    def deficits(snap: dict[str, dict[str, float]]) -> dict[str, float]:
        return snap.get("dlpm_deficit", {})

    def refill(q: dict[str, float], clients: set[str]) -> None:
        m = min(math.floor(-q[c] / quantum) for c in clients) + 1
        for c in clients:
            q[c] += m * quantum

    for ev in trace.arrivals:  # a client that starts waiting gets one quantum, keeping debt
        before, after = deficits(ev.before), deficits(ev.after)
        expect = dict(before)
        if ev.client not in ev.waiting_clients:
            expect[ev.client] = min(before.get(ev.client, 0.0), 0.0) + quantum
        assert after == expect
    for rnd in trace.rounds:
        snaps = (rnd.before_order, rnd.after_order, rnd.before_step, rnd.after_step)
        assert all(v <= quantum + EPS for s in snaps for v in deficits(s).values())
        # Charged exactly per step; a client whose queue emptied keeps no positive credit.
        expect = dict(deficits(rnd.before_step))
        for c, x in dlpm_cost(rnd, sched).items():
            expect[c] -= x
        for c in {r.client_id for r in rnd.waiting} - set(rnd.backlog):
            expect[c] = min(expect[c], 0.0)
        assert deficits(rnd.after_step) == pytest.approx(expect)
        if rnd.order is None:
            continue
        waiting = {r.client_id for r in rnd.waiting}
        pre, post = dict(deficits(rnd.before_order)), deficits(rnd.after_order)
        if not any(pre[c] > 0 for c in waiting):
            refill(pre, waiting)
        assert post == pytest.approx(pre)
        # The order: LPM among clients with positive tentative deficit, refilling when none.
        tentative = dict(post)
        remaining = list(rnd.waiting)
        matched = rnd.matched
        for rid in rnd.order:
            if not any(tentative[r.client_id] > 0 for r in remaining):
                refill(tentative, {r.client_id for r in remaining})
            eligible = [r for r in remaining if tentative[r.client_id] > 0]
            best = min(eligible, key=lambda r: (-matched[r.rid], *fkey(r)))
            assert rid == best.rid
            remaining.remove(best)
            tentative[best.client_id] -= best.prompt_len - matched[best.rid]


@SETTINGS
@given(w=workloads())
def test_dlpm_with_infinite_quantum_is_lpm(w: dict[str, Any]) -> None:
    a = run(lambda: DLPM(quantum=math.inf), w)
    b = run(lambda: LPM(mode="ideal"), w)
    assert [r.order for r in a.rounds] == [r.order for r in b.rounds]
    assert a.admissions == b.admissions


def skewed(seed: int, n: int, max_out: int) -> list[Spec]:
    """Client c0 shares one long prefix (cache hits); c1 sends unique prompts (misses)."""
    rng = random.Random(seed)
    system = tuple(range(100, 124))
    specs = []
    for i in range(n):
        specs.append(
            Spec(f"a{i:04d}", "c0", (*system, rng.randrange(5)), 0, rng.randint(1, max_out))
        )
        unique = tuple(rng.randrange(1000, 2000) for _ in range(rng.randint(4, 12)))
        specs.append(Spec(f"b{i:04d}", "c1", unique, 0, rng.randint(1, max_out)))
    return specs


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    quantum=st.sampled_from([4.0, 16.0, 64.0]),
    max_running=st.integers(1, 4),
    max_out=st.integers(1, 4),
)
def test_dlpm_gap_is_bounded_under_prefix_skew_where_lpm_grows(
    seed: int, quantum: float, max_running: int, max_out: int
) -> None:
    """DLPM keeps |W_f - W_g| <= Q + w_p L_in + w_q M; LPM's gap grows with the run."""
    kw = {"budget": 40, "max_running": max_running, "cache_prompts": 4, "snapshots": False}
    bound = quantum + 1 * 25 + 2 * max_running * max_out
    lpm_gaps = []
    for n in (20, 60):
        sched = DLPM(quantum=quantum)
        trace = drive(sched, skewed(seed, n, max_out), **kw)
        gaps = service_gaps(trace, lambda rnd, s=sched: dlpm_cost(rnd, s))
        assert gaps and max(gaps) <= bound
        lpm = drive(LPM(mode="ideal"), skewed(seed, n, max_out), **kw)
        lpm_gaps.append(max(service_gaps(lpm, lambda rnd, s=sched: dlpm_cost(rnd, s))))
    assert lpm_gaps[1] > lpm_gaps[0]
    assert lpm_gaps[1] > quantum + 25 + 2 * 4 * 4
