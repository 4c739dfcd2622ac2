"""Batched token sampling: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

One :func:`sample` call handles a whole step's batch in a fixed number of tensor ops, whatever
mix of greedy and sampled requests it holds; per-row settings live in ``[B]`` tensors built
once per step by :meth:`SamplingBatch.build`.

Order of processing (as in vLLM / HF): repetition, presence and frequency penalties on the raw
logits -> temperature -> **logprobs are taken here** -> top-k -> top-p -> min-p -> sample.
So the reported logprobs are those of the distribution the model "meant" after penalties and
temperature, not of the truncated one (which would give ``-inf`` to alternatives and
renormalise the mass of the kept tokens). Greedy rows use temperature 1 for their logprobs.

Seeded sampling uses no ``torch.Generator``: the noise for row ``i``, vocab entry ``v`` is a
counter-based hash of ``(seed_i, step_i, v)``, so a request's tokens depend only on its own
seed, step and logits, never on its batch companions, its position or the device's RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import torch

from slmserve.types import SamplingParams

_MIN_TEMPERATURE = 1e-5
"""Below this a request is decoded greedily: ``logits / T`` would overflow to ``inf``."""

_MASK64 = (1 << 64) - 1
_INF = float("inf")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without waiting for the device: on CUDA through
    pinned memory (torch's caching host allocator), since a copy from pageable memory may wait
    for the work already queued, which would stall an overlapped launch (EngineConfig.overlap).
    """
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _i64(x: int) -> int:
    """Reinterpret the low 64 bits of ``x`` as a signed int64 (torch has no uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _srl_(z: torch.Tensor, shift: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 ``z`` into ``out``: torch's ``>>`` is arithmetic."""
    torch.bitwise_right_shift(z, shift, out=out)
    return out.bitwise_and_((1 << (64 - shift)) - 1)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser, in place on an int64 tensor (multiplies wrap mod 2**64).

    In place with one scratch buffer because on the sampling path ``z`` is ``[B, V]``.
    """
    tmp = torch.empty_like(z)
    z.bitwise_xor_(_srl_(z, 30, tmp)).mul_(_MIX1)
    z.bitwise_xor_(_srl_(z, 27, tmp)).mul_(_MIX2)
    return z.bitwise_xor_(_srl_(z, 31, tmp))


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per row from ``(seed, step)``: the start of that row's noise stream."""
    key = _mix64_(seeds.to(torch.int64) + _GOLDEN)
    return _mix64_(key.add_(steps.to(torch.int64) * _GOLDEN))


def hash_uniform(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` float64 uniforms in the open interval (0, 1), a pure function of the keys.

    Entry ``(i, v)`` is the ``v``-th output of a splitmix64 stream started at ``keys[i]``; its
    top 53 bits become ``(k + 0.5) / 2**53``, which is exact in float64 and never 0 or 1.
    """
    idx = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=keys.device)
    z = _mix64_(keys[:, None] + idx * _GOLDEN)
    u = _srl_(z, 11, z).to(torch.float64)
    return u.add_(0.5).mul_(2.0**-53)


def _gumbel(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``-log(E)`` with ``E = -log(U)`` ~ Exp(1): ``argmax(logp + this)`` is the exponential race
    ``argmax(p / E)``, an exact categorical sample, done in log space so tiny ``p`` cannot
    underflow to 0."""
    u = hash_uniform(keys, vocab_size)
    return u.log_().neg_().log_().neg_().to(torch.float32)


class SampleResult(NamedTuple):
    token_ids: torch.Tensor
    """``[B]`` int64, the chosen tokens."""
    logprobs: torch.Tensor
    """``[B]`` float32 logprob of the chosen token (after penalties and temperature)."""
    top_ids: torch.Tensor | None
    """``[B, K]`` int64 most likely tokens, K = the largest ``logprobs`` asked for in the
    batch; ``None`` when no row asked for any (rows that asked for fewer slice their own)."""
    top_logprobs: torch.Tensor | None
    """``[B, K]`` float32, same distribution as ``logprobs``."""


@dataclass(frozen=True, eq=False)
class SamplingBatch:
    """Per-row sampling settings of one step as device tensors.

    Optional tensors are ``None`` when no row needs that stage, which lets :func:`sample`
    skip it. Truncation settings and RNG keys cover only the rows that sample
    (``sample_rows``); greedy rows never pay for sorting or noise.
    """

    size: int
    vocab_size: int
    temperature: torch.Tensor | None
    """``[B]`` divisor for the logits (1 for greedy rows); ``None`` when all are 1."""
    greedy: torch.Tensor
    """``[B]`` bool."""
    sample_rows: torch.Tensor | None
    """``[S]`` int64 indices of the rows that sample; ``None`` when all rows are greedy."""
    all_sample: bool
    keys: torch.Tensor | None
    """``[S]`` int64 RNG keys, see :func:`row_keys`."""
    top_k: torch.Tensor | None
    """``[S]`` int64 in ``[1, V]`` (V = off)."""
    max_top_k: int
    """Largest ``top_k`` entry (0 when ``top_k`` is ``None``)."""
    top_p: torch.Tensor | None
    """``[S]`` float32 (``inf`` = off, so float rounding of the cumsum can never cut a row
    that did not ask for top-p)."""
    log_min_p: torch.Tensor | None
    """``[S]`` float32 ``log(min_p)`` (``-inf`` = off)."""
    repetition_penalty: torch.Tensor | None
    """``[B]`` float32 (1 = off)."""
    seen: torch.Tensor | None
    """``[B, V]`` bool: token occurs in prompt or output (for the repetition penalty)."""
    presence_penalty: torch.Tensor | None
    """``[B]`` float32."""
    frequency_penalty: torch.Tensor | None
    """``[B]`` float32."""
    counts: torch.Tensor | None
    """``[B, V]`` float32 occurrences of each token in the output."""
    num_logprobs: int
    """K for :attr:`SampleResult.top_ids` (0: none)."""

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]] | None,
        steps: Sequence[int],
        device: torch.device | str,
        vocab_size: int,
    ) -> SamplingBatch:
        """Gather the settings of the rows that sample this step.

        ``steps[i]`` is the index of the token being sampled for row ``i`` (its number of
        output tokens so far); with the seed it selects the row's noise. ``prompt_ids`` feeds
        only the repetition penalty (HF counts prompt and output); ``None`` means output only.
        Unseeded rows get a fresh seed per step from torch's default generator (one draw for
        the whole batch).
        """
        n = len(params)
        if len(output_ids) != n or len(steps) != n:
            raise ValueError(f"{n} params but {len(output_ids)} output_ids and {len(steps)} steps")
        if prompt_ids is not None and len(prompt_ids) != n:
            raise ValueError(f"{n} params but {len(prompt_ids)} prompt_ids")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        dev = torch.device(device)

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), dev)

        greedy = [p.greedy or p.temperature < _MIN_TEMPERATURE for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        sampled = [i for i, g in enumerate(greedy) if not g]

        keys = top_k = top_p = log_min_p = None
        max_top_k = 0
        if sampled:
            sp = [params[i] for i in sampled]
            # Unseeded rows: 62 random bits; seeded ones hash the user's int mod 2**64.
            fresh = torch.randint(0, 1 << 62, (len(sp),), dtype=torch.int64).tolist()
            seeds = [f if p.seed is None else _i64(p.seed) for p, f in zip(sp, fresh)]
            keys = to_device(
                row_keys(
                    torch.tensor(seeds, dtype=torch.int64),
                    torch.tensor([steps[i] for i in sampled], dtype=torch.int64),
                ),
                dev,
            )
            if any(0 < p.top_k < vocab_size for p in sp):
                ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in sp]
                top_k, max_top_k = tensor(ks, torch.int64), max(ks)
            if any(p.top_p < 1.0 for p in sp):
                top_p = tensor([p.top_p if p.top_p < 1.0 else _INF for p in sp], torch.float32)
            if any(p.min_p > 0.0 for p in sp):
                log_min_p = torch.tensor([p.min_p for p in sp], dtype=torch.float32).log()
                log_min_p = to_device(log_min_p, dev)

        # Occurrence tables list only the rows that use them (the others stay all-zero),
        # which keeps this per-step Python work proportional to the penalised rows.
        rep = seen = pres = freq = counts = None
        if any(p.repetition_penalty != 1.0 for p in params):
            rep = tensor([p.repetition_penalty for p in params], torch.float32)
            history: list[Sequence[int]] = []
            for i, (p, out) in enumerate(zip(params, output_ids)):
                if p.repetition_penalty == 1.0:
                    history.append(())
                else:
                    history.append(out if prompt_ids is None else [*prompt_ids[i], *out])
            seen = _occurrences(history, vocab_size, dev) > 0
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            pres = tensor([p.presence_penalty for p in params], torch.float32)
            freq = tensor([p.frequency_penalty for p in params], torch.float32)
            used = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
            counts = _occurrences(
                [out if u else () for out, u in zip(output_ids, used)], vocab_size, dev
            )

        return cls(
            size=n,
            vocab_size=vocab_size,
            temperature=None if all(t == 1.0 for t in temps) else tensor(temps, torch.float32),
            greedy=tensor(greedy, torch.bool),
            sample_rows=tensor(sampled, torch.int64) if sampled else None,
            all_sample=len(sampled) == n,
            keys=keys,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            log_min_p=log_min_p,
            repetition_penalty=rep,
            seen=seen,
            presence_penalty=pres,
            frequency_penalty=freq,
            counts=counts,
            num_logprobs=min(max((p.logprobs or 0 for p in params), default=0), vocab_size),
        )


def _occurrences(
    ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """``[B, V]`` float32 count of each token per row, from one scatter-add."""
    lengths = torch.tensor([len(r) for r in ids], dtype=torch.int64)
    flat = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"token id out of range for vocab_size={vocab_size}")
    rows = torch.repeat_interleave(torch.arange(len(ids)), lengths)
    counts = torch.zeros(len(ids), vocab_size, dtype=torch.float32, device=device)
    ones = torch.ones(flat.numel(), dtype=torch.float32, device=device)
    index = (to_device(rows, device), to_device(flat, device))
    return counts.index_put_(index, ones, accumulate=True)


def _apply_penalties(x: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """HF repetition penalty (prompt + output) then OpenAI presence/frequency (output only).

    Neutral values (1, 0) are exact identities in float arithmetic, so rows that did not ask
    for a penalty are unchanged bit for bit when a companion did.
    """
    if b.repetition_penalty is not None and b.seen is not None:
        r = b.repetition_penalty[:, None]
        x = torch.where(b.seen, torch.where(x > 0, x / r, x * r), x)
    if b.counts is not None and b.presence_penalty is not None and b.frequency_penalty is not None:
        present = (b.counts > 0).to(x.dtype)
        x = x - (b.presence_penalty[:, None] * present + b.frequency_penalty[:, None] * b.counts)
    return x


def _truncate(x: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Mask (to ``-inf``) what top-k, top-p and min-p cut, for the sampling rows ``x``.

    Each filter becomes one per-row logit threshold, so one sort (or a ``topk`` for top-k
    alone) serves every row and nothing is scattered back to vocab order. Ties at a threshold
    are all kept.
    Top-p is applied to the top-k-renormalised distribution (vLLM / HF order); min-p compares
    with the most likely token, which truncation above never removes, so it needs no sort.
    """
    keep_above: torch.Tensor | None = None
    if b.top_k is not None and b.top_p is None:
        # Top-k alone needs only the first max(k) sorted values, not a full sort.
        head = x.topk(b.max_top_k, dim=-1).values
        keep_above = head.gather(1, (b.top_k - 1)[:, None])
    elif b.top_p is not None:
        sorted_x = x.sort(dim=-1, descending=True).values
        if b.top_k is not None:
            keep_above = sorted_x.gather(1, (b.top_k - 1)[:, None])
            sorted_x = sorted_x.masked_fill(sorted_x < keep_above, -_INF)
        probs = sorted_x.softmax(dim=-1)
        # Mass strictly before each token; shifting keeps it monotone, unlike cumsum - p.
        before = torch.nn.functional.pad(probs[:, :-1].cumsum(dim=-1), (1, 0))
        n_keep = (before < b.top_p[:, None]).sum(dim=-1, keepdim=True)  # >= 1: before[0]=0
        thr_p = sorted_x.gather(1, n_keep - 1)
        keep_above = thr_p if keep_above is None else torch.maximum(keep_above, thr_p)
    if b.log_min_p is not None:
        thr_m = x.max(dim=-1, keepdim=True).values + b.log_min_p[:, None]
        keep_above = thr_m if keep_above is None else torch.maximum(keep_above, thr_m)
    return x if keep_above is None else x.masked_fill(x < keep_above, -_INF)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
    """Choose one token per row of ``logits`` ``[B, V]`` (any float dtype; not modified)."""
    if logits.dim() != 2 or logits.shape != (batch.size, batch.vocab_size):
        raise ValueError(
            f"logits must be [{batch.size}, {batch.vocab_size}], got {list(logits.shape)}"
        )
    if logits.device != batch.greedy.device:
        raise ValueError(f"logits on {logits.device} but batch on {batch.greedy.device}")
    x = _apply_penalties(logits.float(), batch)
    if batch.temperature is not None:
        x = x / batch.temperature[:, None]
    lse = torch.logsumexp(x, dim=-1)

    if batch.sample_rows is None:
        tokens = x.argmax(dim=-1)
    else:
        xs = x if batch.all_sample else x.index_select(0, batch.sample_rows)
        assert batch.keys is not None
        # Noise buffer takes the sum: _truncate may return ``x`` (or the caller's logits).
        scores = _gumbel(batch.keys, batch.vocab_size).add_(_truncate(xs, batch))
        picked = scores.argmax(dim=-1)
        if batch.all_sample:
            tokens = picked
        else:
            # argmax(x) is argmax of the unscaled logits too: greedy rows have T = 1 here.
            tokens = x.argmax(dim=-1).index_copy_(0, batch.sample_rows, picked)

    chosen = x.gather(1, tokens[:, None]).squeeze(1) - lse
    top_ids = top_lp = None
    if batch.num_logprobs > 0:
        top = x.topk(batch.num_logprobs, dim=-1)
        top_ids, top_lp = top.indices, top.values - lse[:, None]
    return SampleResult(tokens, chosen, top_ids, top_lp)


def prompt_logprobs(
    logits: torch.Tensor, next_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw (unprocessed) logprobs at prompt positions, for ``prompt_logprobs`` / echo.

    ``logits[j]`` is the model's prediction after prompt token ``j``, ``next_ids[j]`` the
    token that actually followed. Returns the chosen logprobs ``[N]`` and the top-``k`` ids
    and logprobs ``[N, k]`` (``k`` is clamped to the vocab; ``k = 0`` gives ``[N, 0]``).
    """
    if logits.dim() != 2 or next_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"need logits [N, V] and next_ids [N], got {list(logits.shape)} and "
            f"{list(next_ids.shape)}"
        )
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, next_ids.to(torch.int64)[:, None]).squeeze(1)
    top = lp.topk(min(k, lp.shape[1]), dim=-1)
    return chosen, top.indices, top.values
