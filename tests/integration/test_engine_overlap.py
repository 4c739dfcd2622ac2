"""Generation with the next step planned while this one runs (``overlap="on"``): the same
outputs as one step at a time, for every sampling feature, and every KV slot accounted for."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from engine_checks import assert_clean

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect
from slmserve.types import RequestOutput

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _engine(path: Path, overlap: str, **kw: Any) -> Engine:
    config = EngineConfig(model=str(path), device="cpu", dtype="float32", overlap=overlap, **kw)
    return Engine(config)


async def _assert_clean(engine: Engine) -> None:
    # A request's last output can reach its caller while a step that continued it is still
    # on the device: wait until the engine has collected everything.
    assert await engine._wait_idle(5.0)
    assert_clean(engine)
    assert engine.runner.sampled == {}  # no sampled-token tensor outlives its step


async def _run(engine: Engine, requests: list[tuple[Any, SamplingParams]]) -> list[RequestOutput]:
    return list(await asyncio.gather(*(collect(engine.submit(p, s)) for p, s in requests)))


def _same(got: list[RequestOutput], want: list[RequestOutput]) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        for lps_g, lps_w in ((g.logprobs, w.logprobs), (g.prompt_logprobs, w.prompt_logprobs)):
            assert (lps_g is None) == (lps_w is None)
            for a, b in zip(lps_g or [], lps_w or [], strict=True):
                assert (a is None) == (b is None)
                if a is not None and b is not None:
                    assert a.token_id == b.token_id
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
                    assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_every_sampling_feature_gives_the_same_output_planned_ahead(qwen3_dir: Path) -> None:
    """Greedy and seeded sampling, logprobs, prompt logprobs, penalties (whose requests wait
    for their tokens), stop tokens and stop strings met while the next decode is already in
    flight, max_tokens 0 and 1, chunked prefill and shared prefixes, all in one batch."""

    async def reference() -> list[RequestOutput]:
        async with _engine(qwen3_dir, "off", kv_tokens=2048) as engine:
            return await _run(engine, [("the stop", SamplingParams(max_tokens=12, **GREEDY))] * 2)

    full, _ = asyncio.run(reference())
    stop_token = full.token_ids[4]
    stop_text = full.text[3:5]
    long_prompt = "a long shared prompt that needs several chunks " * 3
    requests = [
        *[(f"{long_prompt}{i}", SamplingParams(max_tokens=10 + i, **GREEDY)) for i in range(4)],
        ("seeded", SamplingParams(max_tokens=9, temperature=0.9, top_p=0.9, seed=7, logprobs=2)),
        ("seeded", SamplingParams(max_tokens=9, temperature=1.1, top_k=5, seed=8)),
        ("penalised", SamplingParams(max_tokens=8, repetition_penalty=1.4, **GREEDY)),
        ("penalised", SamplingParams(max_tokens=8, frequency_penalty=0.7, temperature=0.0)),
        ("the stop", SamplingParams(max_tokens=12, stop_token_ids=[stop_token], **GREEDY)),
        ("the stop", SamplingParams(max_tokens=12, stop=[stop_text], **GREEDY)),
        ("echo me", SamplingParams(max_tokens=0, prompt_logprobs=1)),
        ("one", SamplingParams(max_tokens=1, logprobs=1, prompt_logprobs=0, **GREEDY)),
        ([5, 6, 7, 8], SamplingParams(max_tokens=7, temperature=0.0)),  # may meet EOS
    ]

    async def run(overlap: str) -> tuple[list[RequestOutput], int]:
        async with _engine(qwen3_dir, overlap, kv_tokens=2048, chunked_prefill_size=16) as engine:
            out = await _run(engine, requests)
            await _assert_clean(engine)
            return out, engine.times.overlapped

    serial, none = asyncio.run(run("off"))
    ahead, overlapped = asyncio.run(run("on"))
    assert none == 0 and overlapped > 10
    _same(ahead, serial)
    stopped = serial[8:10]
    assert [r.finish_reason for r in stopped] == ["stop", "stop"]
    assert len(stopped[0].token_ids) == full.token_ids.index(stop_token) + 1 < 12
    assert stopped[1].text == full.text[: full.text.find(stop_text)]


def test_a_small_pool_evicts_and_preempts_to_the_same_tokens(qwen3_dir: Path) -> None:
    """More requests than the pool holds: evictions and preemptions happen with steps in
    flight, and nothing changes the greedy tokens."""
    requests = [
        (f"request number {i} " * (1 + i % 3), SamplingParams(max_tokens=24, **GREEDY))
        for i in range(10)
    ]

    async def run(overlap: str) -> tuple[list[RequestOutput], int]:
        async with _engine(qwen3_dir, overlap, kv_tokens=192, max_batch_tokens=64) as engine:
            out = await _run(engine, requests)
            await _assert_clean(engine)
            assert engine.core is not None
            return out, engine.core.num_preemptions + engine.core.num_evicted_tokens

    serial, pressure = asyncio.run(run("off"))
    ahead, pressure_ahead = asyncio.run(run("on"))
    assert pressure > 0 and pressure_ahead > 0
    _same(ahead, serial)


async def test_aborts_and_a_failing_step_with_steps_in_flight(
    qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _engine(qwen3_dir, "on", kv_tokens=2048) as engine:
        streams = [
            engine.submit(f"story {i}", SamplingParams(max_tokens=200, **GREEDY)) for i in range(4)
        ]
        seen = 0
        async for _ in streams[0]:
            seen += 1
            if seen == 5:
                for s in streams:
                    engine.abort(s.request_id)
        outcomes = await asyncio.gather(*(collect(s) for s in streams[1:]))
        assert all(r.finish_reason == "abort" and len(r.token_ids) < 200 for r in outcomes)
        await _assert_clean(engine)

        real, calls = engine.backend.forward, {"n": 0}

        def flaky(batch, kv):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 4:  # a decode step launched while the one before is in flight
                raise RuntimeError("boom")
            return real(batch, kv)

        monkeypatch.setattr(engine.backend, "forward", flaky)
        results = await _run(engine, [("fail me", SamplingParams(max_tokens=10, **GREEDY))])
        assert results[0].finish_reason == "error" and "boom" in (results[0].error or "")
        assert engine.times.overlapped > 0
        await _assert_clean(engine)
        ok = await _run(engine, [("fail me", SamplingParams(max_tokens=10, **GREEDY))])
        assert ok[0].finish_reason == "length" and len(ok[0].token_ids) == 10
        await _assert_clean(engine)
