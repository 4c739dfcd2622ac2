"""Discrete-event simulation of the engine: the real admission logic on simulated time.

The simulator does not model the engine, it *runs* it: the same :class:`EngineCore` (running
requests first, chunked prefill, LRU eviction, preemption of the newest, radix matching every
round, break-on-first-misfit admission in scheduler order, prefix insertion after every prefill
chunk), the same :class:`RadixCache` and the same scheduler objects as ``slmserve serve``. Only
the model run is replaced: a :class:`CostModel` says how long each planned step takes, and every
sampled token is the synthetic :data:`OUTPUT_TOKEN`. A request finishes after the output length
its workload gives it (``max_tokens=output_len, ignore_eos=True``).

The loop, as :meth:`slmserve.engine.engine.AsyncEngine._steps` drives a step:

1. requests whose arrival time has come join the core (``core.add``, ``on_arrival``);
2. nothing to do: jump to the next arrival;
3. ``plan = core.plan_step(now)``; the step lasts ``cost.step_time(plan)``;
4. requests arriving *while the step runs* join the core before it completes (in the engine they
   are submitted while the model runs in its worker thread);
5. ``core.complete_step``; requests that reached their output length finish; the scheduler's
   ``on_step`` sees the report; time advances to the end of the step.

Times recorded per request: arrival, first scheduled (start of the step that admitted it), first
token and finish (end of the step that produced them: a token exists once its step has run).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np

from slmserve.cache.kv_pool import SlotAllocator
from slmserve.engine.core import CoreLimits, EngineCore, StepPlan
from slmserve.engine.sequence import Sequence as Seq
from slmserve.engine.sequence import Status
from slmserve.interfaces import Scheduler
from slmserve.types import DEFAULT_CLIENT, SamplingParams

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OUTPUT_TOKEN = 0
"""The token every simulated step samples. Never an EOS (requests run ``ignore_eos``)."""

NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]


class SimulationError(RuntimeError):
    """The simulated engine cannot make progress (a request that can never fit, a livelock)."""


# ---------------------------------------------------------------------------- cost model


class CostModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Seconds one engine step takes, linear in the work the step plans.

    ``step_time = step_overhead
    + prefill_token * Σ new + prefill_attention * Σ new * (start + (new + 1) / 2)``  (prefill
    chunks: ``new`` tokens starting at position ``start``; the second factor is the mean context
    a new token attends to, i.e. the causal attention area)
    ``+ [decode_step + decode_seq * batch + decode_context * Σ context]``  (only if the step
    decodes; ``batch`` decoding requests with their context lengths).

    A chunk counts as prefill when it computes prompt tokens or more than one token (a preempted
    request recomputing its output is prefill too); a one-token chunk past the prompt is decode.

    Defaults are roughly a 0.5B-parameter model (Qwen2.5-0.5B shape: 24 layers, hidden 896,
    2 KV heads of 64) on one data-centre GPU, not a measurement:

    * ``prefill_token = 1e-5``: 100k prompt tokens/s of GEMM work (~1 GFLOP per token at
      ~100 TFLOP/s effective, bf16).
    * ``prefill_attention = 1e-9``: attention reads ~4·hidden·layers ≈ 86k FLOPs per (token,
      context token), about 1e-4 of the per-token GEMM cost, at lower efficiency: a 2k-token
      context adds ~20% to a token's prefill.
    * ``decode_step = 4e-3`` + ``step_overhead = 1e-3``: a batch-1 decode step of 5 ms (weights
      read once, launch overheads).
    * ``decode_seq = 5e-5``: 256 decoding requests add 12.8 ms.
    * ``decode_context = 1e-8``: KV reads, ~12 KB per context token at ~1.2 TB/s.

    ``slmserve bench profile`` fits these on the real engine (non-negative least squares over
    measured step times); :meth:`load` reads the profile it writes, TOML or JSON.
    """

    step_overhead: NonNegFloat = 1e-3
    prefill_token: NonNegFloat = 1e-5
    prefill_attention: NonNegFloat = 1e-9
    decode_step: NonNegFloat = 4e-3
    decode_seq: NonNegFloat = 5e-5
    decode_context: NonNegFloat = 1e-8

    @staticmethod
    def features(plan: StepPlan) -> list[float]:
        """The regressors of one step, in field order: ``[1, Σ new, Σ attention area,
        decodes?, decoding requests, Σ decode context]`` (what ``bench profile`` fits on)."""
        prefill = attention = 0.0
        batch = context = 0
        for item in plan.items:
            n, start = item.n, item.start
            if n == 1 and start >= item.seq.num_prompt:
                batch += 1
                context += start + 1
            else:
                prefill += n
                attention += n * (start + (n + 1) / 2)
        return [1.0, prefill, attention, float(batch > 0), float(batch), float(context)]

    def step_time(self, plan: StepPlan) -> float:
        _, prefill, attention, decodes, batch, context = self.features(plan)
        t = self.step_overhead + self.prefill_token * prefill + self.prefill_attention * attention
        if decodes:
            t += self.decode_step + self.decode_seq * batch + self.decode_context * context
        return t

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """Read a cost model from TOML or JSON: the top level or a ``cost_model`` table."""
        path = Path(path)
        text = path.read_text()
        try:
            raw = tomllib.loads(text) if path.suffix == ".toml" else msgspec.json.decode(text)
            if isinstance(raw, dict):
                raw = raw.get("cost_model", raw)
            return msgspec.convert(raw, cls)
        except (msgspec.ValidationError, msgspec.DecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"invalid cost model {path}: {exc}") from None

    def to_toml(self) -> str:
        """TOML text :meth:`load` reads back (one ``[cost_model]`` table)."""
        fields = msgspec.structs.asdict(self)
        return "[cost_model]\n" + "".join(f"{k} = {float(v)!r}\n" for k, v in fields.items())


# ---------------------------------------------------------------------------- inputs


class SimConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The simulated engine's capacity: the same knobs as :class:`slmserve.config.EngineConfig`."""

    kv_tokens: PosInt = 65_536
    """KV pool size in tokens (running requests and the prefix cache share it)."""
    max_batch_tokens: PosInt = 2048
    chunked_prefill_size: PosInt = 512
    max_running_requests: PosInt = 256
    max_steps: PosInt = 10_000_000
    """Safety stop: more steps than this raises :class:`SimulationError` (a livelock)."""


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a workload. ``group`` is only a label (e.g. the shared prefix it uses)."""

    rid: str
    arrival: float
    prompt: np.ndarray
    """Prompt token ids (1-D integer array; shared prefixes are equal leading ids)."""
    output_len: int
    client: str = DEFAULT_CLIENT
    group: str | None = None


# ---------------------------------------------------------------------------- outputs


class RequestRecord(msgspec.Struct, kw_only=True):
    """What happened to one request; times in simulated seconds."""

    rid: str
    client: str
    group: str | None
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finish: float | None = None
    prompt_tokens: int
    cached_tokens: int = 0
    """Prompt tokens found in the radix cache when admitted (the admission that led to the first
    token, if it was preempted before that)."""
    output_tokens: int = 0
    admissions: int = 0
    preemptions: int = 0

    @property
    def ttft(self) -> float:
        assert self.first_token is not None
        return self.first_token - self.arrival


@dataclass(slots=True)
class StepLog:
    """One row per engine step (parallel arrays), for throughput and service-over-time metrics.

    ``prompt``/``output`` are ``[steps, clients]`` tokens computed per client in the step;
    ``backlogged[s, c]`` says client ``c`` had a request waiting when step ``s`` was planned.
    """

    clients: list[str]
    start: np.ndarray
    end: np.ndarray
    waiting: np.ndarray
    running: np.ndarray
    admitted: np.ndarray
    preempted: np.ndarray
    prefill_tokens: np.ndarray
    decode_seqs: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    backlogged: np.ndarray

    def __len__(self) -> int:
        return len(self.start)


@dataclass(slots=True)
class SimResult:
    records: list[RequestRecord]
    steps: StepLog
    prefix_hits: int
    prefix_queries: int
    prompt_tokens_computed: int
    num_preemptions: int
    num_evicted_tokens: int
    wall_time: float
    """Real seconds the simulation took."""
    trace: list[tuple[float, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=list
    )
    """With ``trace=True``: per step ``(start, admitted, preempted, finished)`` request ids."""

    @property
    def end_time(self) -> float:
        return float(self.steps.end[-1]) if len(self.steps) else 0.0


# ---------------------------------------------------------------------------- the loop


class SimEngine:
    """One simulated engine replica, stepped by a driver: :func:`simulate` drives one, the
    cluster simulator (:mod:`slmserve.sim.cluster`) drives several side by side in time.

    A step is split in two so a driver can queue arrivals while it "runs": :meth:`begin` plans
    it at ``now`` and returns its end time; :meth:`complete` applies it (prefix insertion,
    sampled tokens, finishes, the scheduler's ``on_step``) and returns the requests that
    finished. ``records`` may be shared between engines (one record per request).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        config: SimConfig,
        cost: CostModel,
        clients: Sequence[str],
        records: dict[str, RequestRecord],
        *,
        check: bool = False,
        trace: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.cost = cost
        self.clients = list(clients)
        self.cindex = {c: i for i, c in enumerate(self.clients)}
        self.records = records
        self.check = check
        self.trace = trace
        self.core = EngineCore(
            SlotAllocator(config.kv_tokens),
            scheduler,
            CoreLimits(
                max_batch_tokens=config.max_batch_tokens,
                chunked_prefill_size=config.chunked_prefill_size,
                max_running_requests=config.max_running_requests,
                max_model_len=sys.maxsize,
            ),
        )
        self.waiting_per_client = [0] * len(self.clients)
        self.client_of: dict[str, int] = {}
        self.rids: list[str] = []
        """Requests added here, in order."""
        self.log = _StepLogBuilder(len(self.clients))
        self.step_trace: list[tuple[float, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = []
        self._plan: StepPlan | None = None
        self._start = self._end = 0.0
        self._has_waiting: list[bool] = []
        self._before = (0, 0)

    def add(self, r: SimRequest, at: float) -> None:
        """``r`` arrives at ``at`` (also while a step is in flight, as in the engine)."""
        params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
        seq = Seq(
            r.rid,
            r.prompt.tolist(),
            params,
            arrival_time=at,
            client_id=r.client,
            eos_ids=frozenset(),
        )
        rec = self.records.get(r.rid)
        if rec is None:
            rec = self.records[r.rid] = RequestRecord(
                rid=r.rid, client=r.client, group=r.group, arrival=at, prompt_tokens=len(r.prompt)
            )
        rec.arrival = at
        ci = self.cindex[r.client]
        self.client_of[r.rid] = ci
        self.waiting_per_client[ci] += 1
        self.rids.append(r.rid)
        self.core.add(seq, at)

    def has_work(self) -> bool:
        return self.core.has_work()

    @property
    def busy(self) -> bool:
        """A step is planned and not completed yet."""
        return self._plan is not None

    def begin(self, now: float) -> float | None:
        """Plan one step at ``now``; return its end time, or ``None`` if the plan had nothing
        to run because everything running was preempted (accounted; plan again)."""
        assert self._plan is None, "complete() the step in flight first"
        if len(self.log) >= self.config.max_steps:
            raise SimulationError(f"no end after {self.config.max_steps} steps (livelock?)")
        core, records = self.core, self.records
        self._has_waiting = [c > 0 for c in self.waiting_per_client]
        self._before = (len(core.waiting), len(core.running))
        plan = core.plan_step(now)
        for rid in plan.admitted:
            self.waiting_per_client[self.client_of[rid]] -= 1
            rec = records[rid]
            if rec.admissions == 0:
                rec.first_scheduled = now
            rec.admissions += 1
        for rid in plan.preempted:
            self.waiting_per_client[self.client_of[rid]] += 1
            records[rid].preemptions += 1
        if not plan.items:
            if plan.preempted:  # everything running was preempted: account, plan again
                self.scheduler.on_step(core.complete_step(plan, {}))
                return None
            head = next(iter(core.waiting))
            raise SimulationError(f"nothing can run although {head!r} waits on an idle engine")
        self._plan, self._start = plan, now
        self._end = now + self.cost.step_time(plan)
        return self._end

    def complete(self) -> tuple[str, ...]:
        """Apply the step in flight at its end time; return the ids that finished."""
        plan, core, end = self._plan, self.core, self._end
        assert plan is not None, "no step in flight"
        self._plan = None
        sampled = {item.seq.rid: OUTPUT_TOKEN for item in plan.items if item.sample}
        report = core.complete_step(plan, sampled)
        for item in plan.items:
            seq = item.seq
            if not item.sample or seq.status is not Status.RUNNING:
                continue
            rec = self.records[seq.rid]
            if rec.first_token is None:
                rec.first_token = end
                rec.cached_tokens = seq.num_cached_tokens
            reason = core.stop_reason(seq)
            if reason is not None:
                core.finish(seq, reason)
                rec.finish = end
                rec.output_tokens = len(seq.output_ids)
        report.finished = core.take_finished()
        self.scheduler.on_step(report)
        if self.check:
            _check(core)
        self.log.add(self._start, end, *self._before, plan, self._has_waiting)
        for rid, (_client, prompt_part, out) in report.computed.items():
            self.log.serve(self.client_of[rid], prompt_part, out)
        finished = tuple(report.finished)
        if self.trace:
            self.step_trace.append(
                (self._start, tuple(plan.admitted), tuple(plan.preempted), finished)
            )
        return finished

    def result(self, rids: Sequence[str] | None = None, *, wall_time: float = 0.0) -> SimResult:
        """The run so far; ``records`` of ``rids`` (default: the requests added here)."""
        core = self.core
        return SimResult(
            records=[self.records[rid] for rid in (self.rids if rids is None else rids)],
            steps=self.log.build(self.clients),
            prefix_hits=core.prefix_hits,
            prefix_queries=core.prefix_queries,
            prompt_tokens_computed=core.prompt_tokens_computed,
            num_preemptions=core.num_preemptions,
            num_evicted_tokens=core.num_evicted_tokens,
            wall_time=wall_time,
            trace=self.step_trace,
        )


def simulate(
    requests: Iterable[SimRequest],
    scheduler: Scheduler,
    config: SimConfig | None = None,
    cost: CostModel | None = None,
    *,
    until: float | None = None,
    backlog: int | None = None,
    per_client: bool = False,
    check: bool = False,
    trace: bool = False,
) -> SimResult:
    """Run ``requests`` through an :class:`EngineCore` driven by ``scheduler`` until all finish.

    ``scheduler`` must be fresh (schedulers keep state).

    * ``until``: no step starts at or after this time. An overloaded run is cut off instead of
      drained (unfinished requests keep ``finish=None``), to measure steady-state throughput
      and fairness rather than the drain.
    * ``backlog``: closed loop. Arrival times are ignored; requests are released in order
      whenever fewer than ``backlog`` requests wait (with ``per_client``: whenever *their
      client* has fewer than ``backlog`` waiting), and are recorded with their release time as
      arrival. The engine stays saturated (per client: every client stays backlogged until its
      requests run out) without the ever-growing queue of an overloaded open loop, whose
      per-round radix matching makes the run quadratic. FCFS admits from the queue's head
      only, so its closed-loop throughput is its throughput with everything arriving at once.
    * ``check``: verify the KV and radix invariants after every step (slow; for tests): the
      core's own integrity check, plus that every running request's locked prefix is still in
      the tree with the slots it was matched with (locked nodes are never evicted).
    * ``trace``: keep a per-step log of request ids (determinism tests).
    """
    config = config or SimConfig()
    cost = cost or CostModel()
    reqs, clients, records = prepare(requests, [config])
    engine = SimEngine(scheduler, config, cost, clients, records, check=check, trace=trace)
    waiting_per_client = engine.waiting_per_client

    # One source in arrival order, or one per client (closed loop per client).
    sources: list[deque[SimRequest]] = [deque(reqs)]
    if backlog is not None and per_client:
        sources = [deque(r for r in reqs if r.client == c) for c in clients]

    def release(t: float, *, before: bool = False) -> None:
        """Queue the requests that arrived by ``t`` (strictly before with ``before``); in a
        closed loop, those that have room."""
        if backlog is None:
            src = sources[0]
            while src and (src[0].arrival < t if before else src[0].arrival <= t):
                r = src.popleft()
                engine.add(r, r.arrival)
        elif per_client:
            for ci, src in enumerate(sources):
                while src and waiting_per_client[ci] < backlog:
                    engine.add(src.popleft(), t)
        else:
            src = sources[0]
            while src and len(engine.core.waiting) < backlog:
                engine.add(src.popleft(), t)

    wall0 = time.perf_counter()
    now = 0.0
    while True:
        release(now)
        if not engine.has_work():
            if backlog is not None or not sources[0]:
                break  # (a closed loop idles only when every source is empty)
            now = sources[0][0].arrival  # idle: jump to the next arrival
            continue
        if until is not None and now >= until:
            break
        end = engine.begin(now)
        if end is None:
            continue
        if backlog is None:
            # In the engine, requests submitted while the model runs are queued before the step
            # completes (so, e.g., the scheduler sees their on_arrival before this on_step).
            release(end, before=True)
        engine.complete()
        now = end

    return engine.result([r.rid for r in reqs], wall_time=time.perf_counter() - wall0)


class _StepLogBuilder:
    """Collects step rows as Python lists; :meth:`build` turns them into a :class:`StepLog`."""

    def __init__(self, nclients: int) -> None:
        self.nclients = nclients
        self.cols: dict[str, list[float]] = {
            k: []
            for k in (
                "start",
                "end",
                "waiting",
                "running",
                "admitted",
                "preempted",
                "prefill_tokens",
                "decode_seqs",
            )
        }
        self.backlogged: list[list[bool]] = []
        self.served: list[tuple[int, int, int, int]] = []  # (step, client, prompt, output)

    def __len__(self) -> int:
        return len(self.backlogged)

    def add(
        self,
        start: float,
        end: float,
        waiting: int,
        running: int,
        plan: StepPlan,
        backlogged: list[bool],
    ) -> None:
        prefill = decode = 0
        for item in plan.items:
            if item.n == 1 and item.start >= item.seq.num_prompt:
                decode += 1
            else:
                prefill += item.n
        row = (start, end, waiting, running, len(plan.admitted), len(plan.preempted))
        for key, value in zip(self.cols, (*row, prefill, decode)):
            self.cols[key].append(value)
        self.backlogged.append(backlogged)

    def serve(self, client: int, prompt: int, output: int) -> None:
        """Tokens computed for ``client`` in the step added last."""
        self.served.append((len(self) - 1, client, prompt, output))

    def build(self, clients: list[str]) -> StepLog:
        steps, nclients = len(self), self.nclients
        prompt = np.zeros((steps, nclients), np.int64)
        output = np.zeros((steps, nclients), np.int64)
        if self.served:
            s, c, p, o = (np.array(col, np.int64) for col in zip(*self.served))
            np.add.at(prompt, (s, c), p)
            np.add.at(output, (s, c), o)
        cols = self.cols
        ints = {k: np.array(cols[k], np.int64) for k in list(cols)[2:]}
        return StepLog(
            clients=clients,
            start=np.array(cols["start"], np.float64),
            end=np.array(cols["end"], np.float64),
            prompt=prompt,
            output=output,
            backlogged=np.array(self.backlogged, bool).reshape(steps, nclients),
            **ints,
        )


def prepare(
    requests: Iterable[SimRequest], configs: Sequence[SimConfig]
) -> tuple[list[SimRequest], list[str], dict[str, RequestRecord]]:
    """Requests in arrival order (checked against every engine config), the sorted client
    names, and a fresh record per request: what every simulated run starts from."""
    reqs = sorted(requests, key=lambda r: (r.arrival, r.rid))
    for config in configs:
        _validate(reqs, config)
    clients = sorted({r.client for r in reqs})
    records = {
        r.rid: RequestRecord(
            rid=r.rid, client=r.client, group=r.group, arrival=r.arrival,
            prompt_tokens=len(r.prompt),
        )
        for r in reqs
    }  # fmt: skip
    return reqs, clients, records


def _validate(reqs: Sequence[SimRequest], config: SimConfig) -> None:
    seen: set[str] = set()
    for r in reqs:
        if r.rid in seen:
            raise ValueError(f"duplicate request id {r.rid!r}")
        seen.add(r.rid)
        if not math.isfinite(r.arrival) or r.arrival < 0:
            raise ValueError(f"request {r.rid!r}: arrival must be finite and >= 0")
        if r.output_len < 1:
            raise ValueError(f"request {r.rid!r}: output_len must be >= 1")
        if r.prompt.ndim != 1 or len(r.prompt) < 1:
            raise ValueError(f"request {r.rid!r}: prompt must be a non-empty 1-D token array")
        # Alone on an idle engine a request holds its prompt and all but its last output token
        # at its last step, plus one: a fully cached prompt recomputes its last token in a
        # fresh slot while the cached node stays locked. Beyond the pool it can never finish.
        need = len(r.prompt) + r.output_len
        if need > config.kv_tokens:
            raise ValueError(
                f"request {r.rid!r} needs up to {need} KV slots, "
                f"more than kv_tokens={config.kv_tokens}"
            )


def _check(core: EngineCore) -> None:
    """Core + cache invariants, and: no running request's locked prefix was evicted."""
    core.check_integrity()
    free = core.allocator.free_slots()
    root = core.cache.root
    for seq in core.running.values():
        if seq.tree_len == 0:
            continue
        node = seq.lock_node
        if node is None:
            raise SimulationError(f"{seq.rid}: {seq.tree_len} tree tokens but no lock")
        while node is not root:
            if node.parent is None or node.lock_ref < 1:
                raise SimulationError(f"{seq.rid}: locked node {node!r} left the tree")
            node = node.parent
        match = core.cache.match_prefix(seq.key(seq.tree_len))
        mine = seq.slots[: seq.tree_len]
        if match.length != seq.tree_len or not np.array_equal(match.slots, mine):
            raise SimulationError(f"{seq.rid}: cached prefix changed under its lock")
        if np.isin(mine, free).any():
            raise SimulationError(f"{seq.rid}: slots of its locked prefix are free")


CAPACITY_BACKLOG = 64
"""Requests kept waiting while measuring capacity: enough to fill any batch."""

CAPACITY_DEFINITION = (
    "capacity = FCFS's saturated throughput (requests/s) on the same requests, engine limits "
    f"and cost model: a closed loop keeps {CAPACITY_BACKLOG} requests waiting, in arrival "
    "order, and capacity = requests / makespan"
)


def measure_capacity(
    requests: Iterable[SimRequest],
    config: SimConfig | None = None,
    cost: CostModel | None = None,
    *,
    backlog: int = CAPACITY_BACKLOG,
) -> float:
    """**Capacity**: FCFS's saturated throughput on these requests, in requests/s.

    The requests run through FCFS in a closed loop that keeps ``backlog`` of them waiting (in
    their arrival order, mix of clients and groups preserved), i.e. the engine never waits for
    work; capacity is ``len(requests) / makespan``. It is the highest rate FCFS can sustain on
    this workload (with the prefix hits FCFS's own order gets), so ``load = 1`` means "FCFS is
    exactly saturated".
    """
    from slmserve.schedulers.fcfs import FCFS

    reqs = list(requests)
    result = simulate(reqs, FCFS(), config, cost, backlog=backlog)
    return len(reqs) / result.end_time if result.end_time > 0 else math.inf
