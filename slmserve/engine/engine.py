"""AsyncEngine: submit requests, stream outputs, one step loop, the model off the event loop.

The loop is deliberately plain: plan a step (pure Python, on the event loop), run the model and
the sampler in a single worker thread (so HTTP handlers stay responsive while the CPU or GPU
computes), then complete the step and push outputs to per-request queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from slmserve.config import DEFAULT_CPU_KV_TOKENS, EngineConfig
from slmserve.engine.batch import STAGING_BUFFERS
from slmserve.engine.core import CoreLimits, EngineCore, StepPlan
from slmserve.engine.runner import LaunchedStep, ModelRunner, StepResult, StepTimes
from slmserve.engine.sequence import Sequence as Seq
from slmserve.engine.sequence import Status
from slmserve.interfaces import ModelBackend
from slmserve.plugins import PluginManager
from slmserve.types import (
    DEFAULT_CLIENT,
    RequestOutput,
    SamplingParams,
    ScoreResult,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_STEPS_IN_FLIGHT = 3
"""Launched, uncollected steps when overlapping. Two hide the host's work behind the device's;
a third absorbs the host's uneven steps when it is nearly as slow as the device
(`benchmarks/overlap.py` with a 5,000 items/s device and the collector on: busy 62-79% of the
time over five runs, 67% in the one run with two), at the cost of one more step of latency for
what arrives meanwhile."""
assert MAX_STEPS_IN_FLIGHT < STAGING_BUFFERS, "a staging buffer must be free for every launch"

OPEN_STEPS_IN_FLIGHT = 2
"""The same limit while a step that generates is in flight. A request decodes the token such a
step samples before the host has seen it, and when that token turns out to end the request
(EOS, a stop string) the next step's work for it is wasted: one step ahead hides the host's
work, and wastes at most one token per finished request."""

GC_THRESHOLDS = (50_000, 20, 100)
"""The collector's pace once the engine has started (with ``gc_freeze``): a young collection
every 50,000 allocations instead of Python's 700. Scoring allocates a few objects per item, and
at the default pace the collector's scans cost the host ~15% of its throughput
(`benchmarks/overlap.py`'s host alone: 6,200-6,700 items/s at (700, 10, 10), 7,400-7,900 here)."""


class EngineClosedError(RuntimeError):
    """The engine is not running (not started yet, or shutting down)."""


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting_requests``; retry later (HTTP 429)."""


class RequestStream:
    """Outputs of one request, in order; iteration ends after the finishing output.

    A deque plus one waiter future rather than an ``asyncio.Queue``: the step loop pushes to
    every running request every step, and this is the cheapest wake-up asyncio offers.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._items: deque[RequestOutput] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.finished = False
        self._consumed = False

    def put(self, output: RequestOutput) -> None:
        if self.finished:
            return
        self.finished = output.finished
        self._items.append(output)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._consumed:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        output = self._items.popleft()
        self._consumed = output.finished
        return output


class AsyncEngine:
    """Continuous-batching engine over one model backend.

    Use as ``async with AsyncEngine(EngineConfig(...)) as engine:``; ``generate`` streams
    :class:`~slmserve.types.RequestOutput` increments for one prompt.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        plugins: PluginManager | None = None,
        backend: ModelBackend | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.plugins = plugins or PluginManager()
        # Resolve names once, at start-up: unknown names fail here with the valid choices.
        self._backend_factory = self.plugins.backends.get(self.config.backend)
        self.scheduler = self.plugins.schedulers.get(self.config.scheduler)(
            **self.config.scheduler_options
        )
        self.backend: ModelBackend | None = backend
        self.core: EngineCore | None = None
        self.kv: Any = None
        self.times = StepTimes()
        self._executor: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._aborts: set[str] = set()
        self._eos_ids: frozenset[int] = frozenset()
        self._ids = itertools.count()
        self._accepting = False
        self.num_finished = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._loop_task is not None:
            return
        if self.config.torch_threads is not None:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="slmserve-model")
        loop = asyncio.get_running_loop()
        if self.backend is None:
            self.backend = await loop.run_in_executor(self._executor, self._load_backend)
        self._eos_ids = frozenset(self.backend.info.eos_token_ids)
        await loop.run_in_executor(self._executor, self._build_kv)
        if self.config.gc_freeze:
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._accepting = True
        self._loop_task = asyncio.create_task(self._step_loop(), name="slmserve-step-loop")
        await self._call_hook("slmserve_startup", engine=self)
        info = self.backend.info
        log.info(
            "engine ready: model=%s device=%s dtype=%s kv_tokens=%d scheduler=%s",
            self.config.model or "demo",
            info.device,
            info.dtype,
            self.kv.num_slots,
            self.config.scheduler,
        )

    def _load_backend(self) -> ModelBackend:
        return self._backend_factory(
            self.config.model,
            device=self.config.device,
            dtype=self.config.dtype,
            **self.config.backend_options,
        )

    def _build_kv(self) -> None:
        import torch

        from slmserve.cache.kv_pool import KVPool

        assert self.backend is not None
        info = self.backend.info
        dtype = getattr(torch, info.dtype)
        device = torch.device(info.device)
        if self.config.kv_tokens is not None:
            slots = self.config.kv_tokens
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            slots = KVPool.slots_for_budget(
                info.kv_layout, dtype, memory_bytes=int(free * self.config.kv_memory_fraction)
            )
        else:
            slots = DEFAULT_CPU_KV_TOKENS
        self.kv = KVPool(info.kv_layout, slots, dtype=dtype, device=device)
        max_len = min(self.config.max_model_len or info.max_position_embeddings, slots)
        limits = CoreLimits(
            max_batch_tokens=self.config.max_batch_tokens,
            chunked_prefill_size=self.config.chunked_prefill_size,
            max_running_requests=self.config.max_running_requests,
            max_model_len=max_len,
        )
        self.core = EngineCore(self.kv.allocator, self.scheduler, limits, on_finish=self._on_finish)
        self.runner = ModelRunner(
            self.backend,
            self.kv,
            self.times,
            cuda_graphs=self.config.cuda_graphs,
            max_batch=self.config.max_running_requests,
            max_ctx=max_len,
        )

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish within ``timeout``, abort the rest.

        Concurrent calls share one shutdown."""
        if self._shutdown_task is None:
            if self._loop_task is None:
                return
            self._shutdown_task = asyncio.ensure_future(self._shutdown(timeout))
        try:
            await asyncio.shield(self._shutdown_task)
        finally:
            if self._shutdown_task is not None and self._shutdown_task.done():
                self._shutdown_task = None

    async def _shutdown(self, timeout: float) -> None:
        assert self._loop_task is not None
        self._accepting = False
        if not await self._wait_idle(timeout) and self.core is not None:
            self.abort_all()
            await self._wait_idle(None)  # aborts apply at the next step boundary
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        self._loop_task = None
        await self._call_hook("slmserve_shutdown", engine=self)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _wait_idle(self, timeout: float | None) -> bool:
        """Wait until the loop has no work (or died); False on timeout."""
        assert self._loop_task is not None
        idle = asyncio.ensure_future(self._idle.wait())
        done, _ = await asyncio.wait(
            {idle, self._loop_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        idle.cancel()
        return bool(done)

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def running(self) -> bool:
        return self._accepting and self._loop_task is not None and not self._loop_task.done()

    @property
    def tokenizer(self) -> Any:
        if self.backend is None:
            raise EngineClosedError("the engine has not been started")
        return self.backend.tokenizer

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output in tokens (the model's context, capped by the KV pool)."""
        if self.core is None:
            raise EngineClosedError("the engine is not running")
        return self.core.limits.max_model_len

    @property
    def kv_slots(self) -> int:
        """KV pool size in tokens (0 before start)."""
        return self.kv.num_slots if self.kv is not None else 0

    # ---------------------------------------------------------------- requests

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        client_id: str | None = None,
        stream: RequestStream | None = None,
    ) -> RequestStream:
        """Queue one request and return the stream of its outputs.

        ``stream`` replaces the default output stream with another sink (the engine process
        passes one that forwards outputs to the front process); its ``request_id`` wins.
        Raises ``ValueError`` for a prompt the engine can never serve (empty, token ids outside
        the vocabulary, longer than the model or the KV pool) or invalid sampling parameters,
        and :class:`EngineClosedError` when the engine is not running.
        """
        if not self.running or self.core is None or self.backend is None:
            raise EngineClosedError("the engine is not running")
        self._check_queue(1)
        params = (params or SamplingParams()).check()
        ids = self._prompt_ids(prompt)
        if stream is not None:
            request_id = stream.request_id
        return self._enqueue(
            ids, params, request_id, client_id, stream, detok=self._detokenizer(ids, params)
        )

    def _check_queue(self, n: int) -> None:
        assert self.core is not None
        if len(self.core.waiting) + n > self.config.max_waiting_requests:
            raise QueueFullError(
                f"{len(self.core.waiting)} requests are waiting and {n} more would exceed "
                f"max_waiting_requests={self.config.max_waiting_requests}; retry later"
            )

    def _enqueue(
        self,
        ids: list[int],
        params: SamplingParams,
        request_id: str | None,
        client_id: str | None,
        stream: RequestStream | None = None,
        **seq_options: Any,
    ) -> RequestStream:
        assert self.core is not None and self.backend is not None
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.core.waiting or rid in self.core.running:
            raise ValueError(f"request id {rid!r} is already in use")
        stream = stream or RequestStream(rid)
        now = time.monotonic()
        seq = Seq(
            rid,
            ids,
            params,
            arrival_time=now,
            client_id=client_id or DEFAULT_CLIENT,
            eos_ids=self._eos_ids,
            stream=stream,
            **seq_options,
        )
        self.core.add(seq, now)
        self._wake.set()
        return stream

    async def score(
        self,
        query: str | Sequence[int],
        items: Sequence[str | Sequence[int]],
        *,
        label_token_ids: Sequence[int],
        apply_softmax: bool = True,
        item_first: bool = False,
        template: str | None = None,
        client_id: str | None = None,
    ) -> ScoreResult:
        """Score every item against the query: prefill only, label logits only.

        The text before ``{item}`` in the template (the query and any fixed instruction, when
        the query comes first) is tokenized once and computed once: a cache-warming request
        runs it first, then every item extends it through the radix cache. ``item_first``
        puts the item before the query, which leaves nothing to share but a fixed preamble.
        Raises ``ValueError`` for bad input and ``RuntimeError`` if an item fails.
        """
        if not self.running or self.core is None or self.backend is None:
            raise EngineClosedError("the engine is not running")
        labels = self._label_ids(label_token_ids)
        check_items(items)
        self._check_queue(len(items) + 1)
        before, after, item_ids = await self._score_pieces(query, items, item_first, template)
        prompts = [before + ids + after for ids in item_ids]
        for i, ids in enumerate(prompts):
            if len(item_ids[i]) == 0:
                raise ValueError(f"item {i} is empty")
            self._check_length(ids, what=f"item {i} with the query and template")
        params = SamplingParams(max_tokens=1)
        streams: list[RequestStream] = []
        try:
            if len(before) > 1:
                streams.append(self._enqueue(before, params, None, client_id, label_ids=()))
                async for _ in streams[0]:
                    pass
            items_at = len(streams)
            streams += [
                self._enqueue(
                    p, params, None, client_id, label_ids=labels, apply_softmax=apply_softmax
                )
                for p in prompts
            ]
            finals = [await _last(s) for s in streams[items_at:]]
        except asyncio.CancelledError:  # the caller went away: so does its work
            for stream in streams:
                if not stream.finished:
                    self.abort(stream.request_id)
            raise
        failed = [(i, o.error or o.finish_reason) for i, o in enumerate(finals) if o.scores is None]
        if failed:
            raise RuntimeError(f"scoring failed for item {failed[0][0]}: {failed[0][1]}")
        return ScoreResult(
            scores=[o.scores or [] for o in finals],
            prompt_tokens=sum(o.num_prompt_tokens for o in finals),
            cached_tokens=sum(o.num_cached_tokens for o in finals),
        )

    def _label_ids(self, label_token_ids: Sequence[int]) -> tuple[int, ...]:
        assert self.backend is not None
        vocab = self.backend.info.vocab_size
        labels = tuple(int(t) for t in label_token_ids)
        if not labels:
            raise ValueError("label_token_ids is empty: give the label token ids to read")
        bad = [t for t in labels if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"label_token_ids outside the vocabulary [0, {vocab}): {bad}")
        return labels

    async def _score_pieces(
        self,
        query: str | Sequence[int],
        items: Sequence[str | Sequence[int]],
        item_first: bool,
        template: str | None,
    ) -> tuple[list[int], list[int], list[list[int]]]:
        """Token ids before the item, after it, and of every item (tokenized in one batch)."""
        tok = self.tokenizer
        if isinstance(query, str) != all(isinstance(x, str) for x in items):
            raise ValueError("query and items must both be text or both be token ids")
        if not isinstance(query, str):
            if template is not None:
                raise ValueError("a template needs text query and items, not token ids")
            q = list(map(int, query))
            ids = [list(map(int, x)) for x in items]
            for i, x in enumerate(ids):
                self._check_ids(x, what=f"item {i}")
            self._check_ids(q, what="query")
            return ([], q, ids) if item_first else (q, [], ids)
        template = template or ("{item}{query}" if item_first else "{query}{item}")
        if template.count("{item}") != 1:
            raise ValueError("template must contain {item} exactly once")
        head, tail = (part.replace("{query}", query) for part in template.split("{item}"))

        def encode() -> list[list[int]]:
            texts = [head, tail, *items]
            return list(tok(texts, add_special_tokens=False)["input_ids"])

        encoded = await asyncio.to_thread(encode) if len(items) > 64 else encode()
        return encoded[0], encoded[1], encoded[2:]

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        client_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs for one prompt; leaving the loop early aborts the request."""
        stream = self.submit(prompt, params, request_id=request_id, client_id=client_id)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; it ends with ``finish_reason="abort"`` at the next step boundary."""
        self._aborts.add(request_id)
        self._wake.set()

    def abort_all(self) -> None:
        """Abort every waiting and running request (a second shutdown signal)."""
        if self.core is not None:
            self._aborts.update(self.core.waiting)
            self._aborts.update(self.core.running)
            self._wake.set()

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        assert self.backend is not None
        info = self.backend.info
        return prompt_token_ids(prompt, self.backend.tokenizer, info.vocab_size, self.max_model_len)

    def _check_ids(self, ids: list[int], *, what: str) -> None:
        assert self.backend is not None
        check_token_ids(ids, self.backend.info.vocab_size, what=what)

    def _check_length(self, ids: list[int], *, what: str) -> None:
        check_prompt_length(ids, self.max_model_len, what=what)

    def _detokenizer(self, ids: list[int], params: SamplingParams) -> Any:
        from slmserve.engine.detokenize import IncrementalDetokenizer

        assert self.backend is not None
        return IncrementalDetokenizer(
            self.backend.tokenizer,
            ids,
            stop=list(params.stop),
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    # ---------------------------------------------------------------- the step loop

    async def _step_loop(self) -> None:
        """Run steps until cancelled; a bug that escapes a step fails every request loudly."""
        assert self.core is not None
        try:
            await self._steps(self.core)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("engine step loop crashed; failing all requests")
            self._accepting = False
            self._fail_everything(f"engine failure: {type(exc).__name__}: {exc}")
            raise

    def _fail_everything(self, error: str) -> None:
        assert self.core is not None
        for seq in [*self.core.waiting.values(), *self.core.running.values()]:
            seq.error = error
            if seq.stream is not None:
                seq.stream.put(
                    RequestOutput(
                        request_id=seq.rid,
                        new_token_ids=[],
                        new_text="",
                        finish_reason="error",
                        error=error,
                    )
                )

    async def _steps(self, core: EngineCore) -> None:
        """Plan, launch, collect, complete: one step at a time, or, when :attr:`overlaps`, up
        to :data:`OPEN_STEPS_IN_FLIGHT` steps in flight (:data:`MAX_STEPS_IN_FLIGHT` while
        every one is closed, see :attr:`StepPlan.closed`).

        With steps in flight the device has the next ones queued behind the current one while
        the host waits for, accounts and emits the current one's results, then plans another:
        the host's per-step work no longer leaves the device idle. The core plans each step to
        continue after those in flight (a decode reads the token the step before samples, on
        the device).
        """
        inflight: deque[tuple[StepPlan, LaunchedStep, float]] = deque()
        while True:
            if self._aborts:
                self._apply_aborts(frozenset(it.seq.rid for p, _, _ in inflight for it in p.items))
            if not inflight or (self.overlaps and len(inflight) < _depth(inflight)):
                if not inflight and not core.has_work():
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._idle.clear()
                t0 = time.perf_counter()
                # Requests whose abort waits for their steps get no more work meanwhile.
                plan = core.plan_step(time.monotonic(), frozenset(self._aborts))
                self.times.schedule += time.perf_counter() - t0
                if plan.items:
                    try:
                        launched = await self._on_model_thread(self.runner.launch, plan)
                    except Exception as exc:  # a backend error fails this step's requests only
                        self._finish_step(plan, None, exc, t0)
                    else:
                        self.times.overlapped += bool(inflight)
                        inflight.append((plan, launched, t0))
                    continue
                if not inflight:
                    self._fail_unschedulable(plan)
                    await asyncio.sleep(0)
                    continue
            plan, launched, t0 = inflight.popleft()
            try:
                result = await self._on_model_thread(self.runner.collect, launched)
            except Exception as exc:
                self._finish_step(plan, None, exc, t0)
            else:
                self._finish_step(plan, result, None, t0)
            await asyncio.sleep(0)  # let handlers run (and enqueue) between steps

    @property
    def overlaps(self) -> bool:
        """Whether steps are overlapped with the next (``EngineConfig.overlap``)."""
        mode = self.config.overlap
        on_cuda = self.kv is not None and self.kv.device.type == "cuda"
        return mode == "on" or (mode == "auto" and on_cuda)

    async def _on_model_thread(self, fn: Callable[[Any], _T], arg: Any) -> _T:
        if self.config.model_thread:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, fn, arg)
        return fn(arg)

    def _finish_step(
        self, plan: StepPlan, result: StepResult | None, error: Exception | None, t0: float
    ) -> None:
        """Account a collected step (or fail its requests when the model run raised)."""
        core = self.core
        assert core is not None
        if result is None:
            log.error("model step failed", exc_info=error)
            report = core.fail(plan, f"{type(error).__name__}: {error}")
        else:
            t2 = time.perf_counter()
            report = core.complete_step(plan, result.sampled, time.monotonic())
            self._emit(plan, result)
            self.times.output += time.perf_counter() - t2
        report.finished = core.take_finished()
        try:
            self.scheduler.on_step(report)
        except Exception:
            log.exception("scheduler %s failed in on_step", self.config.scheduler)
        step = time.perf_counter() - t0
        self.times.steps += 1
        self.times.tokens += plan.num_tokens
        self.times.max_step = max(self.times.max_step, step)

    def _fail_unschedulable(self, plan: StepPlan) -> None:
        """Nothing could run although requests wait: fail the head one instead of spinning."""
        assert self.core is not None
        if self.core.running or not self.core.waiting:
            return
        head = next(iter(self.core.waiting))
        self.core.fail_waiting([head], "request does not fit in the KV cache")

    def _apply_aborts(self, busy: frozenset[str]) -> None:
        """Abort what was asked; a request whose step is still on the device is aborted once
        that step is collected (its slots are being written)."""
        assert self.core is not None
        for rid in [r for r in self._aborts if r not in busy]:
            self._aborts.discard(rid)
            self.core.abort(rid)

    # ---------------------------------------------------------------- outputs

    def _emit(self, plan: StepPlan, result: StepResult) -> None:
        from slmserve.engine.detokenize import add_batch

        core = self.core
        assert core is not None
        sampled: list[Seq] = []
        for item in plan.items:
            seq = item.seq
            if seq.status is not Status.RUNNING:
                continue
            plp = result.prompt_logprobs.get(seq.rid)
            if plp is not None and seq.prompt_logprobs is not None:
                # By position (entry j scores prompt token j): a request preempted and
                # recomputed scores its prompt again, over the same entries.
                seq.prompt_logprobs[item.start + 1 : item.start + 1 + len(plp)] = plp
            if not item.sample:
                continue
            if seq.label_ids is not None:  # scoring: prefill only, no token
                seq.stream.put(
                    RequestOutput(
                        request_id=seq.rid,
                        new_token_ids=[],
                        new_text="",
                        finish_reason="stop",
                        num_prompt_tokens=seq.num_prompt,
                        num_cached_tokens=seq.num_cached_tokens,
                        scores=result.scores.get(seq.rid),
                    )
                )
                core.finish(seq, "stop")
                continue
            if seq.params.max_tokens == 0:
                core.finish(seq, "length")
                continue
            sampled.append(seq)
        texts = add_batch([s.detok for s in sampled], [s.output_ids[-1] for s in sampled])
        for seq, (text, stopped) in zip(sampled, texts):
            token = seq.output_ids[-1]
            lp = result.logprobs.get(seq.rid)
            if lp is not None and seq.logprobs is not None:
                seq.logprobs.append(lp)
            reason = "stop" if stopped else core.stop_reason(seq)
            if reason is not None and not stopped:
                text += seq.detok.flush()
            seq.stream.put(
                RequestOutput(
                    request_id=seq.rid,
                    new_token_ids=[token],
                    new_text=text,
                    finish_reason=reason,
                    num_prompt_tokens=seq.num_prompt,
                    num_cached_tokens=seq.num_cached_tokens,
                    num_output_tokens=len(seq.output_ids),
                    logprobs=[lp] if lp is not None else None,
                    prompt_logprobs=seq.prompt_logprobs if len(seq.output_ids) == 1 else None,
                )
            )
            if reason is not None:
                core.finish(seq, reason)

    def _on_finish(self, seq: Seq) -> None:
        """Every request passes here exactly once when it leaves the engine."""
        self.num_finished += 1
        if seq.stream is not None and not seq.stream.finished:
            seq.stream.put(
                RequestOutput(
                    request_id=seq.rid,
                    new_token_ids=[],
                    new_text="",
                    finish_reason=seq.finish_reason,
                    num_prompt_tokens=seq.num_prompt,
                    num_cached_tokens=seq.num_cached_tokens,
                    num_output_tokens=len(seq.output_ids),
                    prompt_logprobs=seq.prompt_logprobs if not seq.output_ids else None,
                    error=seq.error,
                )
            )
        info = {
            "finish_reason": seq.finish_reason,
            "client_id": seq.sched.client_id,
            "prompt_tokens": seq.num_prompt,
            "cached_tokens": seq.num_cached_tokens,
            "output_tokens": len(seq.output_ids),
            "arrival_time": seq.sched.arrival_time,
            "first_scheduled_time": seq.first_scheduled_time,
            "first_token_time": seq.first_token_time,
            "finish_time": time.monotonic(),
        }
        try:
            self.plugins.hook.slmserve_request_finished(engine=self, request_id=seq.rid, info=info)
        except Exception:  # an observer's bug must not stop the step loop it runs in
            log.exception("a slmserve_request_finished hook failed")

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for metrics endpoints (cheap: no tree walk)."""
        core = self.core
        if core is None:
            return {}
        return {
            "requests_running": len(core.running),
            "requests_waiting": len(core.waiting),
            "kv_slots_total": core.allocator.num_slots,
            "kv_slots_free": core.allocator.num_free,
            "kv_slots_cached": core.cache.total_size,
            "kv_usage": 1.0 - core.allocator.num_free / core.allocator.num_slots,
            "prefix_cache_queries": core.prefix_queries,
            "prefix_cache_hits": core.prefix_hits,
            "prompt_tokens": core.prompt_tokens_computed,
            "generation_tokens": core.generation_tokens,
            "preemptions": core.num_preemptions,
            "evicted_tokens": core.num_evicted_tokens,
            "requests_finished": self.num_finished,
            "scheduler": self.scheduler.stats(),
        }

    async def _call_hook(self, name: str, **kwargs: Any) -> None:
        for result in getattr(self.plugins.hook, name)(**kwargs):
            if inspect.isawaitable(result):
                await result


def prompt_token_ids(
    prompt: str | Sequence[int], tokenizer: Any, vocab: int, max_model_len: int
) -> list[int]:
    """A prompt as token ids the engine can serve: text is tokenized (no special tokens, through
    the Rust tokenizer directly when there is one: the Python wrapper costs more than the
    encoding), ids are checked against the vocabulary; ``ValueError`` if empty or too long."""
    if isinstance(prompt, str):
        fast = getattr(tokenizer, "backend_tokenizer", None)
        if fast is not None:
            ids = fast.encode(prompt, add_special_tokens=False).ids
        else:
            ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    else:
        ids = [int(t) for t in prompt]
        check_token_ids(ids, vocab, what="prompt")
    if not ids:
        raise ValueError("prompt is empty")
    check_prompt_length(ids, max_model_len, what="prompt")
    return ids


def check_token_ids(ids: Sequence[int], vocab: int, *, what: str) -> None:
    """``ValueError`` naming the first few ids outside ``[0, vocab)``."""
    if not ids or (min(ids) >= 0 and max(ids) < vocab):  # C-speed common case
        return
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{what} token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def check_prompt_length(ids: Sequence[int], limit: int, *, what: str) -> None:
    """``ValueError`` unless a prompt leaves room for one output token in ``limit``."""
    if len(ids) >= limit:
        raise ValueError(
            f"{what} has {len(ids)} tokens; the limit is {limit - 1} "
            f"(max_model_len {limit} leaves room for at least one output token)"
        )


def check_items(items: Sequence[str | Sequence[int]]) -> None:
    """A list of items, not one string (which would score each of its characters)."""
    if isinstance(items, str):
        raise ValueError("items must be a list of texts or token-id lists, not one string")
    if not items:
        raise ValueError("items is empty: give at least one item to score")


def _depth(inflight: deque[tuple[StepPlan, LaunchedStep, float]]) -> int:
    """How many steps may be in flight, given those that are."""
    closed = all(plan.closed for plan, _, _ in inflight)
    return MAX_STEPS_IN_FLIGHT if closed else OPEN_STEPS_IN_FLIGHT


async def _last(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    assert last is not None
    return last
