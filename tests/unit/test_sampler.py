"""Sampler: greedy, seeded reproducibility, distribution, truncation, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmserve.engine.sampler import (
    SampleResult,
    SamplingBatch,
    hash_uniform,
    prompt_logprobs,
    row_keys,
    sample,
)
from slmserve.types import SamplingParams

V = 40


def run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    *,
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    steps: list[int] | None = None,
) -> SampleResult:
    n = len(params)
    batch = SamplingBatch.build(
        params,
        outputs if outputs is not None else [[] for _ in range(n)],
        prompts,
        steps if steps is not None else [0] * n,
        "cpu",
        logits.shape[1],
    )
    return sample(logits, batch)


def seeded_draws(logits_row: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """``n`` samples of one distribution in a single call: seeds 0..n-1, one row each."""
    rows = [SamplingParams(**{**_fields(params), "seed": s}) for s in range(n)]
    return run(logits_row.expand(n, -1).contiguous(), rows).token_ids


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__struct_fields__}


def logits_of(seed: int, b: int, v: int = V, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


# --- the hash RNG -------------------------------------------------------------------------

MASK = (1 << 64) - 1


def _splitmix_finaliser(z: int) -> int:
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_hash_matches_pure_python_splitmix64() -> None:
    """Guards the int64 emulation of uint64 (wrapping multiply, logical shift)."""
    golden = 0x9E3779B97F4A7C15
    seeds, steps = [0, 1, -1, 2**63 - 1, -(2**63), 987654321], [0, 3, 1, 7, 2, 100]
    keys = row_keys(torch.tensor(seeds), torch.tensor(steps))
    for key, seed, step in zip(keys.tolist(), seeds, steps):
        want = _splitmix_finaliser(_splitmix_finaliser(seed + golden) + step * golden)
        assert key & MASK == want
    u = hash_uniform(keys, 5)
    for row, key in zip(u.tolist(), keys.tolist()):
        for v, got in enumerate(row):
            bits = _splitmix_finaliser(key + (v + 1) * golden) >> 11
            assert got == (bits + 0.5) / 2**53


def test_hash_uniforms_are_uniform_and_open_interval() -> None:
    keys = row_keys(torch.arange(64), torch.zeros(64, dtype=torch.int64))
    u = hash_uniform(keys, 1000).flatten()
    assert u.min() > 0.0 and u.max() < 1.0
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    expected = u.numel() / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # 9 dof, p = 0.001


# --- greedy -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 6), v=st.integers(2, 300), seed=st.integers(0, 2**16))
def test_greedy_is_argmax(b: int, v: int, seed: int) -> None:
    logits = logits_of(seed, b, v)
    greedy = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=0.7)]
    params = [greedy[i % 2] for i in range(b)]
    res = run(logits, params)
    assert torch.equal(res.token_ids, logits.argmax(-1))
    assert res.top_ids is None and res.top_logprobs is None


def test_greedy_with_bf16_logits_and_logprobs_at_temperature_one() -> None:
    logits = logits_of(1, 3).to(torch.bfloat16)
    res = run(logits, [SamplingParams(temperature=0.0)] * 3)
    assert torch.equal(res.token_ids, logits.float().argmax(-1))
    ref = torch.log_softmax(logits.float(), -1).gather(1, res.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(res.logprobs, ref)


# --- seeded reproducibility ---------------------------------------------------------------

COMPANIONS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.9),
    SamplingParams(seed=7, top_p=0.5),
    SamplingParams(seed=8, top_k=3, min_p=0.2),
    SamplingParams(seed=9, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5),
    SamplingParams(top_k=1, logprobs=5),
]


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    target=st.sampled_from(
        [
            SamplingParams(seed=123),
            SamplingParams(seed=-5, temperature=0.6, top_p=0.8),
            SamplingParams(seed=2**70, top_k=4),
            SamplingParams(seed=0, min_p=0.1, temperature=1.5),
        ]
    ),
)
def test_same_seed_same_tokens_whatever_the_batch(
    data: st.DataObject, target: SamplingParams
) -> None:
    """The target row yields the same token (and logprob) in any batch at any position."""
    row = logits_of(99, 1)
    alone = [run(row, [target], steps=[s]) for s in range(4)]
    companions = data.draw(st.lists(st.sampled_from(COMPANIONS), max_size=5))
    pos = data.draw(st.integers(0, len(companions)))
    params = [*companions[:pos], target, *companions[pos:]]
    logits = logits_of(data.draw(st.integers(0, 1000)), len(params))
    logits[pos] = row[0]
    for step, ref in enumerate(alone):
        steps = [data.draw(st.integers(0, 50)) for _ in params]
        steps[pos] = step
        outputs = [[1, 2, 2] for _ in params]
        outputs[pos] = []
        res = run(logits, params, outputs=outputs, steps=steps)
        assert res.token_ids[pos] == ref.token_ids[0]
        assert res.logprobs[pos] == ref.logprobs[0]


def test_seed_and_step_change_the_draw() -> None:
    row = torch.zeros(1, 1000)  # uniform: every draw is a fresh token
    by_step = {int(run(row, [SamplingParams(seed=1)], steps=[s]).token_ids) for s in range(20)}
    by_seed = {int(run(row, [SamplingParams(seed=s)]).token_ids) for s in range(20)}
    unseeded = {int(run(row, [SamplingParams()]).token_ids) for _ in range(20)}
    assert len(by_step) > 15 and len(by_seed) > 15 and len(unseeded) > 15


# --- distribution -------------------------------------------------------------------------


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# chi-square 0.999 quantiles by degrees of freedom
CHI2_999 = {2: 13.8, 3: 16.3, 5: 20.5, 7: 24.3}


@pytest.mark.parametrize(
    ("params", "expect"),
    [
        (SamplingParams(), lambda lg: lg.softmax(-1)),
        (SamplingParams(temperature=0.5), lambda lg: (lg / 0.5).softmax(-1)),
        (SamplingParams(top_k=4), lambda lg: _keep(lg, lg.topk(4).indices).softmax(-1)),
    ],
    ids=["plain", "temperature", "top_k"],
)
def test_samples_follow_the_distribution(params: SamplingParams, expect) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 0.2, -1.0, 0.8, -0.2])
    probs = expect(logits)
    tokens = seeded_draws(logits, params, 20_000)
    dof = int((probs > 0).sum()) - 1
    assert chi_square(tokens, probs) < CHI2_999[dof]


def _keep(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(logits, -math.inf)
    out[idx] = logits[idx]
    return out


def test_chi_square_check_can_fail() -> None:
    """The check above would notice a sampler that ignores the temperature."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 0.2, -1.0, 0.8, -0.2])
    tokens = seeded_draws(logits, SamplingParams(), 20_000)
    assert chi_square(tokens, (logits / 0.5).softmax(-1)) > CHI2_999[7]


# --- truncation ---------------------------------------------------------------------------


def ref_top_p_set(logits: torch.Tensor, p: float) -> set[int]:
    """Smallest set of most likely tokens whose mass reaches ``p``."""
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for t in order:
        if mass >= p:
            break
        kept.append(t)
        mass += float(probs[t])
    return set(kept)


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 12), seed=st.integers(0, 1000))
def test_top_k_never_leaves_the_top_k(k: int, seed: int) -> None:
    logits = logits_of(seed, 1, scale=0.3)[0]  # flat: without top-k the tail gets drawn
    allowed = set(logits.topk(k).indices.tolist())
    drawn = set(seeded_draws(logits, SamplingParams(top_k=k, temperature=1.3), 600).tolist())
    assert drawn <= allowed
    if k > 1:
        assert drawn == allowed


@settings(max_examples=10, deadline=None)
@given(p=st.floats(0.05, 0.99), seed=st.integers(0, 1000))
def test_top_p_keeps_the_smallest_set_reaching_p(p: float, seed: int) -> None:
    logits = logits_of(seed, 1, v=16, scale=1.0)[0]
    allowed = ref_top_p_set(logits, p)
    drawn = set(seeded_draws(logits, SamplingParams(top_p=p), 3000).tolist())
    assert drawn <= allowed
    # Every kept token with a fair chance (>= 0.3% after renormalising) shows up in 3000 draws.
    probs = logits.softmax(-1)
    mass = sum(float(probs[t]) for t in allowed)
    assert all(float(probs[t]) / mass < 3e-3 for t in allowed - drawn)


def test_top_k_then_top_p_on_renormalised_mass() -> None:
    # top-3 of these holds 0.5/0.3/0.2 after renormalising: top_p=0.75 keeps two of them.
    logits = torch.tensor([0.5, 0.3, 0.2, 0.19, 0.18, 0.17]).log()
    drawn = set(seeded_draws(logits, SamplingParams(top_k=3, top_p=0.75), 500).tolist())
    assert drawn == {0, 1}


@settings(max_examples=10, deadline=None)
@given(min_p=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_min_p(min_p: float, seed: int) -> None:
    logits = logits_of(seed, 1, v=24, scale=1.0)[0]
    params = SamplingParams(min_p=min_p, temperature=0.8)
    probs = (logits / 0.8).softmax(-1)
    allowed = {t for t in range(24) if probs[t] >= min_p * probs.max() * (1 - 1e-5)}
    drawn = set(seeded_draws(logits, params, 1000).tolist())
    assert drawn <= allowed


# --- penalties and logprobs ---------------------------------------------------------------


def ref_processed(
    logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """Per-row reference: HF repetition penalty, OpenAI presence/frequency, temperature."""
    x = logits.clone().double()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    temperature = p.temperature if not p.greedy else 1.0
    return x / temperature


@settings(max_examples=25, deadline=None)
@given(data=st.data(), b=st.integers(1, 5))
def test_penalties_and_logprobs_match_reference(data: st.DataObject, b: int) -> None:
    v = 16  # small enough that logprobs=v returns the whole distribution
    params, prompts, outputs = [], [], []
    for _ in range(b):
        params.append(
            SamplingParams(
                temperature=data.draw(st.sampled_from([0.0, 0.5, 1.0, 1.7])),
                repetition_penalty=data.draw(st.sampled_from([1.0, 0.8, 1.3, 2.0])),
                presence_penalty=data.draw(st.sampled_from([0.0, -0.5, 1.0, 2.0])),
                frequency_penalty=data.draw(st.sampled_from([0.0, 0.3, -1.0, 2.0])),
                logprobs=v,
                seed=data.draw(st.integers(0, 100)),
            )
        )
        prompts.append(data.draw(st.lists(st.integers(0, v - 1), max_size=8)))
        outputs.append(data.draw(st.lists(st.integers(0, v - 1), max_size=8)))
    logits = logits_of(data.draw(st.integers(0, 1000)), b, v)
    res = run(logits, params, outputs=outputs, prompts=prompts)
    assert res.top_ids is not None and res.top_logprobs is not None
    for i, p in enumerate(params):
        ref = torch.log_softmax(ref_processed(logits[i], p, prompts[i], outputs[i]), -1).float()
        got = torch.empty(v).scatter_(0, res.top_ids[i], res.top_logprobs[i])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert bool((res.top_logprobs[i][:-1] >= res.top_logprobs[i][1:]).all())
        torch.testing.assert_close(res.logprobs[i], ref[res.token_ids[i]])
        if p.greedy:
            assert res.token_ids[i] == ref.argmax()


def test_penalty_reference_check_can_fail() -> None:
    """Penalties visibly move the logprobs, so the comparison above is not vacuous."""
    logits = logits_of(3, 1)
    p = SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5)
    res = run(logits[:, :20], [SamplingParams(logprobs=20)], outputs=[[1, 1, 2]])
    penalised = torch.log_softmax(ref_processed(logits[0, :20], p, [], [1, 1, 2]), -1).float()
    assert res.top_ids is not None and res.top_logprobs is not None
    got = torch.empty(20).scatter_(0, res.top_ids[0], res.top_logprobs[0])
    assert not torch.allclose(got, penalised, atol=1e-3)


def test_repetition_penalty_without_prompt_counts_output_only() -> None:
    logits = torch.ones(1, 4)
    logits[0, 0] = 2.0
    p = [SamplingParams(temperature=0.0, repetition_penalty=100.0)]
    assert run(logits, p, outputs=[[]], prompts=[[0]]).token_ids.item() != 0
    assert run(logits, p, outputs=[[]], prompts=None).token_ids.item() == 0


def test_top_logprobs_k_is_the_batch_maximum() -> None:
    logits = logits_of(4, 3)
    res = run(logits, [SamplingParams(logprobs=2), SamplingParams(), SamplingParams(logprobs=5)])
    assert res.top_ids is not None and res.top_logprobs is not None
    assert res.top_ids.shape == (3, 5) and res.top_logprobs.shape == (3, 5)
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(res.top_logprobs, lp.topk(5).values)
    assert run(logits, [SamplingParams(logprobs=0)] * 3).top_ids is None


# --- mixed batches ------------------------------------------------------------------------

MIXED = [
    SamplingParams(temperature=0.0, logprobs=2),
    SamplingParams(seed=1, top_k=5),
    SamplingParams(seed=2, top_p=0.6, temperature=0.7),
    SamplingParams(top_k=1, temperature=1.2),
    SamplingParams(seed=3, top_k=8, top_p=0.9, min_p=0.05, logprobs=4),
    SamplingParams(seed=4, repetition_penalty=1.2, frequency_penalty=0.4),
    SamplingParams(seed=5, temperature=2.0, min_p=0.3),
]


def test_mixed_batch_equals_each_row_alone() -> None:
    logits = logits_of(5, len(MIXED))
    outputs = [[i, i + 1, 3] for i in range(len(MIXED))]
    prompts = [[9, i] for i in range(len(MIXED))]
    steps = list(range(len(MIXED)))
    res = run(logits, MIXED, outputs=outputs, prompts=prompts, steps=steps)
    assert res.top_ids is not None and res.top_logprobs is not None
    for i, p in enumerate(MIXED):
        one = run(logits[i : i + 1], [p], outputs=[outputs[i]], prompts=[prompts[i]], steps=[i])
        assert res.token_ids[i] == one.token_ids[0]
        assert res.logprobs[i] == one.logprobs[0]
        if p.logprobs:
            assert one.top_ids is not None and one.top_logprobs is not None
            assert torch.equal(res.top_ids[i, : p.logprobs], one.top_ids[0, : p.logprobs])
            assert torch.equal(res.top_logprobs[i, : p.logprobs], one.top_logprobs[0])


def test_sample_leaves_logits_untouched() -> None:
    logits = logits_of(6, len(MIXED))
    before = logits.clone()
    run(logits, MIXED, outputs=[[1]] * len(MIXED))
    run(logits, [SamplingParams(seed=1)] * len(MIXED))
    assert torch.equal(logits, before)


def test_result_dtypes() -> None:
    res = run(logits_of(7, 2).half(), [SamplingParams(seed=1, logprobs=1), SamplingParams()])
    assert res.token_ids.dtype == torch.int64 and res.logprobs.dtype == torch.float32
    assert res.top_ids is not None and res.top_ids.dtype == torch.int64
    assert res.top_logprobs is not None and res.top_logprobs.dtype == torch.float32


def test_empty_batch() -> None:
    res = run(torch.zeros(0, V), [])
    assert res.token_ids.shape == (0,) and res.logprobs.shape == (0,)


# --- prompt logprobs ----------------------------------------------------------------------


def test_prompt_logprobs() -> None:
    logits = logits_of(8, 6)
    nxt = torch.tensor([3, 0, 39, 7, 7, 1])
    chosen, top_ids, top_lp = prompt_logprobs(logits, nxt, 3)
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(chosen, lp[torch.arange(6), nxt])
    assert torch.equal(top_ids, lp.topk(3).indices)
    torch.testing.assert_close(top_lp, lp.topk(3).values)
    _, ids0, lp0 = prompt_logprobs(logits, nxt, 0)
    assert ids0.shape == (6, 0) and lp0.shape == (6, 0)


# --- validation ---------------------------------------------------------------------------


def test_invalid_inputs_raise_value_error() -> None:
    p = [SamplingParams(), SamplingParams()]
    batch = SamplingBatch.build(p, [[], []], None, [0, 0], "cpu", V)
    for bad in (torch.zeros(3, V), torch.zeros(2, V + 1), torch.zeros(V), torch.zeros(2, V, 1)):
        with pytest.raises(ValueError):
            sample(bad, batch)
    with pytest.raises(ValueError):
        SamplingBatch.build(p, [[]], None, [0, 0], "cpu", V)
    with pytest.raises(ValueError):
        SamplingBatch.build(p, [[], []], None, [0], "cpu", V)
    with pytest.raises(ValueError):
        SamplingBatch.build(p, [[], []], [[1]], [0, 0], "cpu", V)
    with pytest.raises(ValueError):
        SamplingBatch.build([SamplingParams(presence_penalty=1.0)], [[V]], None, [0], "cpu", V)
    with pytest.raises(ValueError):
        prompt_logprobs(torch.zeros(3, V), torch.zeros(2, dtype=torch.int64), 1)
