"""One engine step on the device: batch, forward, logits where needed, sampling, scores.

Everything here runs in the engine's single worker thread, so the event loop stays free while
the CPU or GPU computes. The only device->host copy is the small result tensors at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from slmserve.engine.core import StepPlan
from slmserve.engine.sequence import Sequence as Seq
from slmserve.interfaces import ModelBackend
from slmserve.types import TokenLogprob


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

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


@dataclass(slots=True)
class StepResult:
    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)


class ModelRunner:
    """Runs step plans through a backend over a KV pool, timing each phase."""

    def __init__(self, backend: ModelBackend, kv: Any, times: StepTimes) -> None:
        self.backend = backend
        self.kv = kv
        self.times = times

    def run(self, plan: StepPlan) -> StepResult:
        """Worker thread: forward, logits where needed, sampling; one device->host copy.

        Full-vocabulary logits are computed only for rows someone reads in full: the last
        token of a generating request, prompt-logprob rows, and raw-logprob scoring rows.
        Scoring with softmax reads just the label rows of the LM head.
        """
        import torch

        from slmserve.engine.batch import build_batch

        assert self.backend is not None
        t0 = time.perf_counter()
        batch, ranges = build_batch(plan, self.kv.device)
        t1 = time.perf_counter()
        gen, prompt_lp, raw_scores, label_scores = [], [], [], []
        for it, (first, count) in zip(plan.items, ranges):
            seq = it.seq
            if seq.prompt_logprobs is not None and it.start < seq.num_prompt:
                prompt_lp.append((it, first, count))
            if not it.sample:
                continue
            if seq.label_ids is None:
                gen.append((it, first + count - 1))
            elif seq.label_ids:
                (label_scores if seq.apply_softmax else raw_scores).append((it, first + count - 1))
        result = StepResult({})
        with torch.inference_mode():
            hidden = self.backend.forward(batch, self.kv)
            rows = [r for _, r in gen]
            for _, first, count in prompt_lp:
                rows.extend(range(first, first + count))
            rows.extend(r for _, r in raw_scores)
            logits = None
            if rows:
                index = torch.tensor(rows, device=hidden.device)
                logits = self.backend.logits(hidden.index_select(0, index))
            t2 = time.perf_counter()
            if gen:
                assert logits is not None
                self._sample([it for it, _ in gen], logits[: len(gen)], result)
            offset = len(gen)
            for it, _, count in prompt_lp:
                self._prompt_logprobs(it, logits[offset : offset + count], result)
                offset += count
            if raw_scores:
                lps = torch.log_softmax(logits[offset:], dim=-1)
                self._collect_scores(raw_scores, lps, result, gather=True)
            if label_scores:
                self._label_scores(hidden, label_scores, result)
        self.times.batch += t1 - t0
        self.times.forward += t2 - t1
        self.times.sample += time.perf_counter() - t2
        return result

    def _label_scores(self, hidden: Any, items: list[Any], result: StepResult) -> None:
        """Softmax over the label logits only (never the whole vocabulary)."""
        import torch

        assert self.backend is not None
        groups: dict[tuple[int, ...], list[Any]] = {}
        for entry in items:
            groups.setdefault(entry[0].seq.label_ids, []).append(entry)
        for labels, entries in groups.items():
            index = torch.tensor([r for _, r in entries], device=hidden.device)
            vocab = torch.tensor(labels, device=hidden.device)
            lab = self.backend.logits(hidden.index_select(0, index), vocab_ids=vocab)
            self._collect_scores(entries, torch.softmax(lab, dim=-1), result, gather=False)

    @staticmethod
    def _collect_scores(items: list[Any], values: Any, result: StepResult, *, gather: bool) -> None:
        import torch

        if gather:  # full-vocabulary log-probs: pick each request's label columns
            labels = torch.tensor([it.seq.label_ids for it, _ in items], device=values.device)
            values = values.gather(1, labels)
        (host,) = _to_host(values)
        for (it, _), row in zip(items, host.tolist()):
            result.scores[it.seq.rid] = row

    @staticmethod
    def _sample(items: list[Any], logits: Any, result: StepResult) -> None:
        """Sample one token per generating request; ``logits`` rows follow ``items``."""
        from slmserve.engine.sampler import SamplingBatch, sample

        seqs = [it.seq for it in items]
        sbatch = SamplingBatch.build(
            [s.params for s in seqs],
            [s.output_ids for s in seqs],
            # Prompt ids matter only for the repetition penalty.
            [s.tokens[: s.num_prompt] if s.params.repetition_penalty != 1.0 else [] for s in seqs],
            [len(s.output_ids) for s in seqs],
            logits.device,
            logits.shape[-1],
        )
        res = sample(logits, sbatch)
        host = _to_host(res.token_ids, res.logprobs, res.top_ids, res.top_logprobs)
        result.sampled.update(zip([s.rid for s in seqs], host[0].tolist()))
        if any(s.logprobs is not None for s in seqs):
            ModelRunner._collect_logprobs(seqs, host, result)

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
    def _prompt_logprobs(it: Any, logits: Any, result: StepResult) -> None:
        import torch

        from slmserve.engine.sampler import prompt_logprobs

        seq = it.seq
        # Row j scores token start + j + 1; keep rows whose next token is still prompt.
        end = min(it.start + it.n, seq.num_prompt - 1)
        count = max(0, end - it.start)
        if count == 0:
            return
        next_ids = seq.tokens[it.start + 1 : it.start + 1 + count]
        nxt = torch.tensor(next_ids, device=logits.device)
        k = seq.params.prompt_logprobs or 0
        chosen, top_ids, top_lps = prompt_logprobs(logits[:count], nxt, k)
        chosen, top_ids, top_lps = _to_host(chosen, top_ids, top_lps)
        out = []
        for j in range(count):
            top = list(zip(top_ids[j].tolist(), top_lps[j].tolist())) if k else []
            out.append(TokenLogprob(next_ids[j], float(chosen[j]), top))
        result.prompt_logprobs[seq.rid] = out


def _to_host(*tensors: Any) -> list[Any]:
    """Copy tensors to the host with one synchronisation (non-blocking copies, then one sync)."""
    import torch

    out = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
    if any(t is not None and t.is_cuda for t in tensors):
        torch.cuda.current_stream().synchronize()
    return out
