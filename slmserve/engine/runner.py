"""One engine step on the device: batch, forward, logits where needed, sampling, scores.

Everything here runs in the engine's single worker thread, so the event loop stays free while
the CPU or GPU computes. The only device->host copy is the small result tensors at the end;
:meth:`ModelRunner.collect` waits for them, separately from the launch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slmserve.engine.core import StepPlan
from slmserve.engine.sequence import Sequence as Seq
from slmserve.interfaces import ModelBackend
from slmserve.types import TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class StepTimes:
    """Cumulative seconds per phase of the step loop (for benchmarks and /metrics)."""

    steps: int = 0
    schedule: float = 0.0
    batch: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    output: float = 0.0
    max_step: float = 0.0
    tokens: int = 0
    overlapped: int = 0
    """Steps launched while the previous one was still on the device."""

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


@dataclass(slots=True)
class StepResult:
    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)


class ModelRunner:
    """Runs step plans through a backend over a KV pool, timing each phase.

    One step costs one host->device copy (the batch and the runner's index arrays, packed by
    :class:`~slmserve.engine.batch.HostStager`) and one device->host synchronisation (every
    result of the step copied back together). It is two calls, :meth:`launch` and
    :meth:`collect`, so the engine can launch the next step before collecting this one
    (``EngineConfig.overlap``). On CUDA, decode-only steps replay a captured graph when the
    backend supports it and ``cuda_graphs`` is on.

    A step planned while the one before is in flight may decode a token that step samples
    (``ScheduledSeq.future``): the runner keeps each generating request's latest sampled-token
    tensor and row, and copies the token into the new batch's input ids on the device, so the
    host never waits for it.
    """

    def __init__(
        self,
        backend: ModelBackend,
        kv: Any,
        times: StepTimes,
        *,
        cuda_graphs: bool = False,
        max_batch: int = 256,
        max_ctx: int = 4096,
    ) -> None:
        from slmserve.engine.batch import HostStager

        self.backend = backend
        self.kv = kv
        self.times = times
        self.stager = HostStager(kv.device)
        self.sampled: dict[str, tuple[Any, int]] = {}
        """Request id -> (token tensor, row) of its latest sampled token not yet collected."""
        self.graphs: Any = None
        if (
            cuda_graphs
            and kv.device.type == "cuda"
            and getattr(backend, "supports_cuda_graphs", False)
        ):
            from slmserve.engine.cuda_graphs import DecodeGraphs

            t0 = time.perf_counter()
            self.graphs = DecodeGraphs(
                backend, kv, max_batch=max_batch, max_ctx=max_ctx, ctx_capacity=2 * kv.num_slots
            )
            log.info(
                "captured CUDA graphs for decode batch sizes %s in %.1f s",
                self.graphs.sizes,
                time.perf_counter() - t0,
            )

    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Worker thread: forward, logits where needed, sampling, and the device->host copies,
        without waiting for any of it. On CUDA this returns while the device still computes,
        so the caller can plan (and launch) the next step meanwhile; on the CPU the work is
        done when it returns.

        Full-vocabulary logits are computed only for rows someone reads in full: the last
        token of a generating request, prompt-logprob rows, and raw-logprob scoring rows.
        Scoring with softmax reads just the label rows of the LM head. A step copies nothing
        from pageable host memory (that may wait for the device): its index arrays all go
        through the pinned stager, and the sampler's few small per-row tensors through pinned
        memory too (:func:`~slmserve.engine.sampler.to_device`).
        """
        import torch

        from slmserve.engine.batch import flatten

        assert self.backend is not None
        t0 = time.perf_counter()
        host = flatten(plan)
        futures = self._future_inputs(plan, host.arrays[3])
        gen, prompt_lp, raw_scores, label_scores = [], [], [], []
        for it, (first, count) in zip(plan.items, host.ranges):
            seq = it.seq
            if seq.prompt_logprobs is not None and it.start < seq.num_prompt:
                prompt_lp.append((it, first, count))
            if not it.sample:
                continue
            if seq.label_ids is None:
                gen.append((it, first + count - 1))
            elif seq.label_ids:
                (label_scores if seq.apply_softmax else raw_scores).append((it, first + count - 1))
        rows = [r for _, r in gen]
        for _, first, count in prompt_lp:
            rows.extend(range(first, first + count))
        rows.extend(r for _, r in raw_scores)
        groups: dict[tuple[int, ...], list[Any]] = {}
        for entry in label_scores:
            groups.setdefault(entry[0].seq.label_ids, []).append(entry)
        extras = [np.asarray(rows, np.int64)]
        for _, dst, src in futures:
            extras += [np.asarray(dst, np.int64), np.asarray(src, np.int64)]
        if raw_scores:
            extras.append(np.asarray([it.seq.label_ids for it, _ in raw_scores], np.int64).ravel())
        for labels, entries in groups.items():
            extras += [np.asarray([r for _, r in entries], np.int64), np.asarray(labels, np.int64)]
        batch, (row_index, *indices) = host.to_device(self.stager, extras)
        future_rows = [(indices.pop(0), indices.pop(0)) for _ in futures]
        raw_labels = indices.pop(0).view(len(raw_scores), -1) if raw_scores else None
        t1 = time.perf_counter()
        result = StepResult({})
        fetch = _Fetch()
        tokens = None
        with torch.inference_mode():
            for (source, _, _), (dst, src) in zip(futures, future_rows):
                batch.input_ids.index_copy_(0, dst, source.index_select(0, src))
            if self.graphs is not None and self.graphs.fits(batch):
                hidden = self.graphs.run(batch)
            else:
                hidden = self.backend.forward(batch, self.kv)
            logits = self.backend.logits(hidden.index_select(0, row_index)) if rows else None
            t2 = time.perf_counter()
            if gen:
                assert logits is not None
                tokens = self._sample([it for it, _ in gen], logits[: len(gen)], fetch, result)
            offset = len(gen)
            for it, _, count in prompt_lp:
                self._prompt_logprobs(it, logits[offset : offset + count], fetch, result)
                offset += count
            if raw_scores:
                values = torch.log_softmax(logits[offset:], dim=-1).gather(1, raw_labels)
                fetch.add(values, then=lambda v: _store_scores(raw_scores, v.tolist(), result))
            if groups:
                self._label_scores(hidden, groups, indices, fetch, result)
            fetch.start(getattr(self.backend, "completion_marker", None), self.kv.device)
        self.times.batch += t1 - t0
        self.times.forward += t2 - t1
        for row, (it, _) in enumerate(gen):  # once the whole launch has succeeded
            self.sampled[it.seq.rid] = (tokens, row)
        return LaunchedStep(result, fetch, t2, tokens, [it.seq.rid for it, _ in gen])

    def collect(self, step: LaunchedStep) -> StepResult:
        """Wait for a launched step (its one synchronisation) and fill in its results."""
        for rid in step.sampled_rids:  # the host has these tokens from now on
            if self.sampled.get(rid, (None,))[0] is step.tokens:
                del self.sampled[rid]
        step.fetch.finish()
        self.times.sample += time.perf_counter() - step.launched
        return step.result

    def _future_inputs(
        self, plan: StepPlan, cu_new: np.ndarray
    ) -> list[tuple[Any, list[int], list[int]]]:
        """For the plan's ``future`` items: per source token tensor, the rows of this batch's
        input ids to fill and the rows of the source to fill them from."""
        by_source: dict[int, tuple[Any, list[int], list[int]]] = {}
        for i, it in enumerate(plan.items):
            if not it.future:
                continue
            try:
                source, row = self.sampled[it.seq.rid]
            except KeyError:
                raise RuntimeError(
                    f"request {it.seq.rid!r} decodes a token no launched step samples"
                ) from None
            entry = by_source.setdefault(id(source), (source, [], []))
            entry[1].append(int(cu_new[i]))
            entry[2].append(row)
        return list(by_source.values())

    def _label_scores(
        self,
        hidden: Any,
        groups: dict[tuple[int, ...], list[Any]],
        index: list[Any],
        fetch: _Fetch,
        result: StepResult,
    ) -> None:
        """Softmax over the label logits only (never the whole vocabulary); every group's
        probabilities go back to the host as ONE small tensor."""
        import torch

        probs = []
        for g in range(len(groups)):
            rows, vocab = index[2 * g], index[2 * g + 1]
            lab = self.backend.logits(hidden.index_select(0, rows), vocab_ids=vocab)
            if tuple(lab.shape) != (rows.shape[0], vocab.shape[0]):  # shapes: no device sync
                raise RuntimeError(
                    f"backend {getattr(self.backend, 'name', type(self.backend).__name__)!r} "
                    f"returned label logits of shape "
                    f"{list(lab.shape)} for {rows.shape[0]} rows x {vocab.shape[0]} labels"
                )
            probs.append(torch.softmax(lab, dim=-1).reshape(-1))
        flat = probs[0] if len(probs) == 1 else torch.cat(probs)

        def store(values: Any) -> None:
            values, start = values.tolist(), 0
            for labels, entries in groups.items():
                k = len(labels)
                rows = [values[start + i * k : start + (i + 1) * k] for i in range(len(entries))]
                _store_scores(entries, rows, result)
                start += k * len(entries)

        fetch.add(flat, then=store)

    @staticmethod
    def _sample(items: list[Any], logits: Any, fetch: _Fetch, result: StepResult) -> Any:
        """Sample one token per generating request; ``logits`` rows follow ``items``. Returns
        the sampled token ids (on the device)."""
        from slmserve.engine.sampler import SamplingBatch, sample

        seqs = [it.seq for it in items]
        sbatch = SamplingBatch.build(
            [s.params for s in seqs],
            [s.output_ids for s in seqs],
            # Prompt ids matter only for the repetition penalty.
            [s.tokens[: s.num_prompt] if s.params.repetition_penalty != 1.0 else [] for s in seqs],
            # The index of the token sampled (its seeded noise): tokens still in flight count.
            [it.start + it.n - it.seq.num_prompt for it in items],
            logits.device,
            logits.shape[-1],
        )
        res = sample(logits, sbatch)

        def store(*host: Any) -> None:
            result.sampled.update(zip([s.rid for s in seqs], host[0].tolist()))
            if any(s.logprobs is not None for s in seqs):
                ModelRunner._collect_logprobs(seqs, list(host), result)

        fetch.add(res.token_ids, res.logprobs, res.top_ids, res.top_logprobs, then=store)
        return res.token_ids

    @staticmethod
    def _collect_logprobs(seqs: list[Seq], host: list[Any], result: StepResult) -> None:
        ids, lps, top_ids, top_lps = host
        for i, s in enumerate(seqs):
            if s.params.logprobs is None:
                continue
            k = s.params.logprobs
            top = []
            if k and top_ids is not None:
                top = list(zip(top_ids[i, :k].tolist(), top_lps[i, :k].tolist()))
            result.logprobs[s.rid] = TokenLogprob(int(ids[i]), float(lps[i]), top)

    @staticmethod
    def _prompt_logprobs(it: Any, logits: Any, fetch: _Fetch, result: StepResult) -> None:
        import torch

        from slmserve.engine.sampler import prompt_logprobs, to_device

        seq = it.seq
        # Row j scores token start + j + 1; keep rows whose next token is still prompt.
        end = min(it.start + it.n, seq.num_prompt - 1)
        count = max(0, end - it.start)
        if count == 0:
            return
        next_ids = seq.tokens[it.start + 1 : it.start + 1 + count]
        nxt = to_device(torch.tensor(next_ids), logits.device)
        k = seq.params.prompt_logprobs or 0

        def store(chosen: Any, top_ids: Any, top_lps: Any) -> None:
            out = []
            for j in range(count):
                top = list(zip(top_ids[j].tolist(), top_lps[j].tolist())) if k else []
                out.append(TokenLogprob(next_ids[j], float(chosen[j]), top))
            result.prompt_logprobs[seq.rid] = out

        fetch.add(*prompt_logprobs(logits[:count], nxt, k), then=store)


def _store_scores(items: list[Any], rows: list[list[float]], result: StepResult) -> None:
    for (it, _), row in zip(items, rows):
        result.scores[it.seq.rid] = row


@dataclass(slots=True)
class LaunchedStep:
    """A step whose device work is queued; :meth:`ModelRunner.collect` waits for it."""

    result: StepResult
    fetch: _Fetch
    launched: float
    tokens: Any
    """The step's sampled token ids on the device (``None`` if it samples none)."""
    sampled_rids: list[str]


class _Fetch:
    """The device results of one step, copied to the host together (one synchronisation);
    each ``then`` callback receives its own tensors' host copies."""

    def __init__(self) -> None:
        self.tensors: list[Any] = []
        self.callbacks: list[tuple[int, int, Callable[..., None]]] = []
        self.host: list[Any] = []
        self.wait: Callable[[], None] = _nothing

    def add(self, *tensors: Any, then: Callable[..., None]) -> None:
        self.callbacks.append((len(self.tensors), len(tensors), then))
        self.tensors.extend(tensors)

    def start(self, marker: Callable[[], Callable[[], None]] | None, device: Any) -> None:
        """Queue the non-blocking copies and mark the end of the step's device work: a CUDA
        event recorded after the copies (waiting on it waits for this step only, not for a
        step launched after it), or ``marker()`` where the backend keeps a device of its own.
        A step with nothing to copy back is waited for too, so the host never runs more than
        the steps it launched ahead of the device."""
        import torch

        tensors = self.tensors
        self.host = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
        if marker is not None:
            self.wait = marker()
        elif device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self.wait = event.synchronize

    def finish(self) -> None:
        self.wait()
        for start, count, then in self.callbacks:
            then(*self.host[start : start + count])


def _nothing() -> None:
    """CPU results are ready when launched."""
