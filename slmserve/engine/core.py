"""The synchronous heart of the engine: admission, KV allocation, preemption, completion.

Pure Python + numpy, no torch and no asyncio, so the step logic is the same in the server, in
property tests and in the simulator. One step is ``plan_step`` (choose what runs and give it KV
slots) followed by ``complete_step`` (account what ran, append sampled tokens, cache prefixes,
finish requests). The async engine runs the model between the two.

With ``EngineConfig.overlap`` the engine plans step N+1 before step N is collected. The core
tracks what is in flight on each request (``Sequence.num_scheduled``, ``num_future``), so the
next plan continues where the launched work ends: a prompt's next chunk, or a decode whose input
token is the one step N samples (``ScheduledSeq.future``: still on the device; the runner reads
it there). Slots freed while a step that writes them is in flight (an abort, a finish, an
insert that found the prefix cached) can only be handed to a step launched after it, which the
device runs after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from slmserve.cache.kv_pool import KVCacheExhausted, SlotAllocator
from slmserve.cache.radix import RadixCache
from slmserve.cache.tracker import PrefixTracker
from slmserve.engine.sequence import Sequence, Status
from slmserve.interfaces import Scheduler
from slmserve.types import FinishReason, StepReport

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSeq:
    """``n`` tokens of ``seq`` starting at ``start`` run this step, writing KV to ``new_slots``."""

    seq: Sequence
    start: int
    n: int
    new_slots: np.ndarray
    context: np.ndarray
    sample: bool
    """The chunk reaches the end of the sequence: read logits at its last token."""
    future: bool = False
    """The input token (``n == 1``) is sampled by a step still in flight: it is not in
    ``seq.tokens`` yet, and the runner takes it from that step's output on the device."""


@dataclass(slots=True)
class StepPlan:
    now: float
    items: list[ScheduledSeq] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(item.n for item in self.items)

    @property
    def closed(self) -> bool:
        """Every request of the step is a scoring (or cache-warming) request: no token it
        produces feeds a later step, so nothing is lost by running further ahead of it (the
        engine keeps more closed steps in flight than open ones)."""
        return all(it.seq.label_ids is not None for it in self.items)


@dataclass(slots=True)
class CoreLimits:
    max_batch_tokens: int
    chunked_prefill_size: int
    max_running_requests: int
    max_model_len: int


class EngineCore:
    """Waiting and running requests over one KV pool, one radix cache and one scheduler."""

    def __init__(
        self,
        allocator: SlotAllocator,
        scheduler: Scheduler,
        limits: CoreLimits,
        *,
        on_finish: Callable[[Sequence], None] | None = None,
    ) -> None:
        self.allocator = allocator
        self.cache = RadixCache(allocator)
        self.scheduler = scheduler
        # Policies that never read matched_len (FCFS, VTC) skip prefix tracking altogether.
        self._tracker = PrefixTracker(self.cache) if scheduler.uses_prefix_match else None
        self.limits = limits
        self.on_finish = on_finish
        self.waiting: dict[str, Sequence] = {}
        self.running: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self.num_evicted_tokens = 0
        self._finished: list[str] = []
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens_computed = 0
        self.generation_tokens = 0

    # ---------------------------------------------------------------- requests in and out

    def add(self, seq: Sequence, now: float) -> None:
        if seq.rid in self.waiting or seq.rid in self.running:
            raise ValueError(f"request id {seq.rid!r} is already in the engine")
        self._wait(seq)
        try:
            self.scheduler.on_arrival(seq.sched, now)
        except Exception as exc:  # a policy bug: refuse this request, leave no trace of it
            del self.waiting[seq.rid]
            if self._tracker is not None:
                self._tracker.discard(seq.rid)
            log.exception("scheduler %s failed in on_arrival", self.scheduler.name)
            raise RuntimeError(
                f"scheduler {self.scheduler.name!r} failed on the request's arrival: {exc!r}"
            ) from exc

    def _wait(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting[seq.rid] = seq
        if self._tracker is not None:
            self._tracker.add(seq.rid, seq.key(self._reusable(seq)))

    def abort(self, rid: str) -> Sequence | None:
        """Remove a request wherever it is; its cached KV stays in the tree, unlocked."""
        seq = self.waiting.pop(rid, None) or self.running.pop(rid, None)
        if seq is not None:
            self._finish(seq, "abort")
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- planning

    def plan_step(self, now: float, hold: frozenset[str] = frozenset()) -> StepPlan:
        """The next step, continuing after any steps still in flight. Running requests named
        in ``hold`` are left out (the engine holds back requests about to be aborted)."""
        plan = StepPlan(now)
        budget = self._plan_running(plan, hold)
        if budget > 0 and self.waiting and not plan.preempted:
            self._admit(plan, budget)
            if plan.admitted:
                try:
                    self.scheduler.on_admit(plan.admitted, now)
                except Exception:  # a policy bug: the plan stands, its accounting is lost
                    log.exception("scheduler %s failed in on_admit", self.scheduler.name)
        return plan

    def _continues(self, seq: Sequence) -> bool:
        """Whether a request with work in flight can be given more: not if it needs a sampled
        token still on the device and will finish on it (length limits), or its sampling reads
        its output so far (penalties), which the host has not seen yet."""
        if seq.num_future == 0:
            return True
        p = seq.params
        return (
            len(seq.output_ids) + seq.num_future < p.max_tokens
            and len(seq.tokens) + seq.num_future < self.limits.max_model_len
            and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0
        )

    def _plan_running(self, plan: StepPlan, hold: frozenset[str]) -> int:
        """Schedule running requests oldest first; return the budget left for admissions."""
        budget = self.limits.max_batch_tokens
        wants: list[tuple[Sequence, int]] = []
        running = [
            s
            for s in self.running.values()
            if s.num_pending > 0 and s.rid not in hold and (not s.in_flight or self._continues(s))
        ]
        for seq in running:
            if budget <= 0:
                break
            n = min(seq.num_pending, self.limits.chunked_prefill_size, budget)
            wants.append((seq, n))
            budget -= n
        # Common case: one allocation for the whole running set.
        slots = self._try_alloc(sum(n for _, n in wants))
        if slots is not None:
            offset = 0
            for seq, n in wants:
                self._schedule(plan, seq, n, slots[offset : offset + n])
                offset += n
            return budget
        # Memory is short: go request by request, evicting, then preempting the newest. With
        # work in flight nobody is preempted: what fits after evicting runs, the rest waits for
        # that work to be collected, and the next plan (nothing in flight) preempts as the
        # one-step-at-a-time loop would.
        running = [s for s in running if not s.in_flight]
        budget = self.limits.max_batch_tokens
        if any(s.in_flight for s in self.running.values()):
            for seq in running:
                n = min(seq.num_pending, self.limits.chunked_prefill_size, budget)
                slots = self._try_alloc(n) if n > 0 else None
                if slots is None:
                    break
                self._schedule(plan, seq, n, slots)
                budget -= n
            return budget
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_pending, self.limits.chunked_prefill_size, budget)
            slots = self._alloc_or_preempt(n, seq, running, plan)
            if slots is None:  # ``seq`` itself was preempted
                break
            self._schedule(plan, seq, n, slots)
            budget -= n
            i += 1
        return budget

    def _schedule(self, plan: StepPlan, seq: Sequence, n: int, slots: np.ndarray) -> None:
        start = seq.num_scheduled
        context = seq.context_slots(slots, start)
        sample = start + n == len(seq.tokens) + seq.num_future
        future = start >= len(seq.tokens)
        plan.items.append(ScheduledSeq(seq, start, n, slots, context, sample, future))
        seq.num_scheduled = start + n
        if sample and seq.label_ids is None and seq.params.max_tokens > 0:
            seq.num_future += 1

    def _alloc_or_preempt(
        self, n: int, seq: Sequence, running: list[Sequence], plan: StepPlan
    ) -> np.ndarray | None:
        """Slots for ``seq``: evict cached prefixes, then preempt the newest running requests.

        Returns ``None`` when ``seq`` itself had to be preempted. Requests after ``seq`` in
        ``running`` have not been scheduled this step, so taking them back is safe.
        """
        while True:
            slots = self._try_alloc(n)
            if slots is not None:
                return slots
            victim = running.pop()  # newest first, as vLLM does
            self._preempt(victim, plan)
            if victim is seq:
                return None

    def _try_alloc(self, n: int) -> np.ndarray | None:
        short = n - self.allocator.num_free
        if short > 0:
            self.num_evicted_tokens += self.cache.evict(short)
        try:
            return self.allocator.alloc(n)
        except KVCacheExhausted:
            return None

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Return a running request to the queue; keep its arrival time and generated tokens."""
        del self.running[seq.rid]
        self._release(seq)
        self._wait(seq)
        plan.preempted.append(seq.rid)
        self.num_preemptions += 1
        try:
            self.scheduler.on_arrival(seq.sched, plan.now)
        except Exception:  # a policy bug: the request waits all the same
            log.exception("scheduler %s failed in on_arrival", self.scheduler.name)

    @staticmethod
    def _reusable(seq: Sequence) -> int:
        """How much of a request's tokens cached KV may stand for: at least one token must
        run so the request gets logits, and a request that wants prompt log-probabilities
        computes its whole prompt (cached KV has no logits)."""
        return 0 if seq.prompt_logprobs is not None else len(seq.tokens) - 1

    def _admit(self, plan: StepPlan, budget: int) -> None:
        # Only requests whose radix path changed since last round are re-matched; the ones
        # actually admitted are matched afresh below either way.
        if self._tracker is not None:
            waiting = self.waiting
            for rid, length in self._tracker.refresh():
                waiting[rid].sched.matched_len = length
        # Slots the running requests still need: the rest of their prompt (beyond this step's
        # chunk and what is in flight), plus the next decode token of those that generate. An
        # admission must leave them free (or evictable), or a long prompt admitted on its first
        # chunk alone would later preempt.
        reserve = sum(seq.num_pending + (seq.label_ids is None) for seq in self.running.values())
        try:
            order = self.scheduler.order([s.sched for s in self.waiting.values()], plan.now)
        except Exception as exc:  # a policy bug: what it was to order fails, the rest runs on
            log.exception("scheduler %s failed in order", self.scheduler.name)
            self.fail_waiting(
                list(self.waiting), f"scheduler {self.scheduler.name!r} failed: {exc!r}"
            )
            return
        for view in order:
            if budget <= 0 or len(self.running) >= self.limits.max_running_requests:
                break
            seq = self.waiting[view.rid]
            # Matched afresh (an admission above may have evicted), splitting a partly
            # matched edge so the lock below pins only what this request reuses.
            match = self.cache.match_prefix(seq.key(self._reusable(seq)), split=True)
            seq.sched.matched_len = matched = match.length
            uncached = len(seq.tokens) - matched
            n = min(uncached, self.limits.chunked_prefill_size, budget)
            decodes = int(len(seq.output_ids) + 1 < seq.params.max_tokens)  # needs a next slot
            self.cache.lock(match.node)
            if self.allocator.num_free + self.cache.evictable_size < uncached + decodes + reserve:
                self.cache.unlock(match.node)
                break
            slots = self._try_alloc(n)
            if slots is None:
                self.cache.unlock(match.node)
                break
            del self.waiting[seq.rid]
            if self._tracker is not None:
                self._tracker.discard(seq.rid)
            seq.lock_node = match.node
            seq.tree_len = matched
            seq.context_slots(match.slots[:matched], 0)
            seq.num_computed = seq.num_scheduled = matched
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = plan.now
            if not seq.output_ids:
                seq.num_cached_tokens = matched
            self.prefix_queries += len(seq.tokens)
            self.prefix_hits += matched
            seq.status = Status.RUNNING
            self.running[seq.rid] = seq
            plan.admitted.append(seq.rid)
            self._schedule(plan, seq, n, slots)
            budget -= n
            reserve += uncached - n + decodes

    # ---------------------------------------------------------------- completion

    def complete_step(
        self, plan: StepPlan, sampled: dict[str, int], now: float | None = None
    ) -> StepReport:
        """Account for a step whose model run succeeded; ``sampled`` maps rid -> next token.

        ``now`` is when the step ended (first-token times are stamped with it); default: the
        plan's start time."""
        end = plan.now if now is None else now
        report = StepReport(now=plan.now, admitted=plan.admitted, preempted=plan.preempted)
        for item in plan.items:
            seq = item.seq
            if seq.status is not Status.RUNNING:
                continue  # aborted while the model ran: already released
            seq.num_computed = item.start + item.n
            prompt_part = max(0, min(seq.num_prompt, seq.num_computed) - item.start)
            token = sampled.get(seq.rid) if item.sample else None
            report.computed[seq.rid] = (seq.sched.client_id, prompt_part, int(token is not None))
            self.prompt_tokens_computed += prompt_part
            seq.sched.num_computed = seq.num_computed
            if item.n > 1 or not seq.output_ids:
                self._cache_prefix(seq)
            if item.sample and seq.num_future > 0:
                seq.num_future -= 1
            if token is None or seq.params.max_tokens == 0:
                continue
            seq.tokens.append(token)
            seq.output_ids.append(token)
            self.generation_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = end
            seq.sched.num_output = len(seq.output_ids)
        return report

    def stop_reason(self, seq: Sequence) -> FinishReason | None:
        """Token-level stop conditions after a step (stop strings are the detokenizer's job)."""
        params = seq.params
        if len(seq.output_ids) >= params.max_tokens:
            return "length"
        token = seq.output_ids[-1]
        if (token in seq.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return "stop"
        if len(seq.tokens) >= self.limits.max_model_len:
            return "length"
        return None

    def fail_waiting(self, rids: list[str], error: str) -> None:
        """Fail these waiting requests with ``error`` (they never ran: nothing to release)."""
        for rid in rids:
            seq = self.waiting.pop(rid)
            seq.error = error
            self._finish(seq, "error")

    def fail(self, plan: StepPlan, error: str) -> StepReport:
        """The model run raised: fail every request of the step, keep everything else."""
        report = StepReport(now=plan.now, admitted=plan.admitted, preempted=plan.preempted)
        for item in plan.items:
            seq = item.seq
            if seq.status is Status.RUNNING:
                # KV of this step was never written: releasing frees its slots (and those of
                # any later step in flight) and keeps only what was computed before.
                seq.error = error
                del self.running[seq.rid]
                self._finish(seq, "error")
        return report

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish a running request (stop condition met)."""
        self.running.pop(seq.rid, None)
        self._finish(seq, reason)

    def _cache_prefix(self, seq: Sequence) -> None:
        """Insert the computed context so later requests hit it while this one decodes."""
        n = seq.num_computed
        if n <= seq.tree_len:
            return
        result = self.cache.insert(seq.key(n), seq.slots.copy())
        seq.set_slots(result.slots)
        self.cache.lock(result.node)
        if seq.lock_node is not None:
            self.cache.unlock(seq.lock_node)
        seq.lock_node = result.node
        seq.tree_len = n

    def _release(self, seq: Sequence) -> None:
        """Give the tree everything computed, free the slots of work still in flight (only
        steps launched later can reuse them), drop the lock; the request holds no KV after."""
        if seq.num_computed > seq.tree_len:
            self._cache_prefix(seq)
        if seq.in_flight:
            self.allocator.free(seq.scheduled_slots[seq.num_computed :].copy())
        if seq.lock_node is not None:
            self.cache.unlock(seq.lock_node)
        seq.lock_node = None
        seq.tree_len = 0
        seq.num_computed = seq.num_scheduled = seq.num_future = 0
        seq.sched.num_computed = 0

    def take_finished(self) -> list[str]:
        """Ids of requests that left since the last call (finished, aborted, failed)."""
        out, self._finished = self._finished, []
        return out

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self._finished.append(seq.rid)
        if self._tracker is not None:
            self._tracker.discard(seq.rid)
        if seq.status is Status.RUNNING:
            self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if self.on_finish is not None:
            self.on_finish(seq)

    # ---------------------------------------------------------------- introspection

    def held_slots(self) -> np.ndarray:
        """Slots privately held by running requests, in flight included (for integrity
        checks)."""
        parts = [s.scheduled_slots[s.tree_len :] for s in self.running.values()]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def check_integrity(self) -> None:
        """Tree slots, private slots and free slots are disjoint and cover the pool."""
        self.cache.check_integrity()
        tree = self.cache.tree_slots()
        private = self.held_slots()
        free = self.allocator.free_slots()
        everything = np.concatenate([tree, private, free])
        if len(everything) != self.allocator.num_slots or len(np.unique(everything)) != len(
            everything
        ):
            raise RuntimeError(
                f"KV slot accounting broken: tree={len(tree)} private={len(private)} "
                f"free={len(free)} total={self.allocator.num_slots}"
            )
