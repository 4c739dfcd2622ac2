"""Engine behaviour on the demo-sized checkpoints: sampling, stops, aborts, errors, API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from engine_checks import assert_clean

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import EngineClosedError, collect


def _engine(path: Path, **kw: object) -> Engine:
    return Engine(EngineConfig(model=str(path), device="cpu", dtype="float32", **kw))  # type: ignore[arg-type]


async def test_seeded_sampling_is_reproducible_across_batches(qwen3_dir: Path) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    async with _engine(qwen3_dir, kv_tokens=2048) as engine:
        alone = await collect(engine.submit("abc", params))
        noise = [
            engine.submit(f"noise {i}", SamplingParams(max_tokens=10, temperature=1.0))
            for i in range(5)
        ]
        crowded = await collect(engine.submit("abc", params))
        await asyncio.gather(*(collect(s) for s in noise))
        other_seed = await collect(
            engine.submit("abc", SamplingParams(max_tokens=10, seed=99, ignore_eos=True))
        )
        assert_clean(engine)
    assert alone.token_ids == crowded.token_ids
    assert alone.token_ids != other_seed.token_ids


async def test_stop_string_is_not_leaked(qwen3_dir: Path) -> None:
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    async with _engine(qwen3_dir, kv_tokens=2048) as engine:
        full = await collect(engine.submit("xyz", greedy))
        assert len(full.text) >= 4
        stop = full.text[2:4]
        first = full.text.find(stop)
        stopped = await collect(
            engine.submit(
                "xyz", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
            )
        )
        assert_clean(engine)
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:first]


async def test_stop_token_ids_and_eos(qwen3_dir: Path) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    async with _engine(qwen3_dir, kv_tokens=2048) as engine:
        full = await collect(engine.submit("hello", greedy))
        target = full.token_ids[3]
        first = full.token_ids.index(target)
        params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[target])
        stopped = await collect(engine.submit("hello", params))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: first + 1]


async def test_abort_mid_generation_frees_everything(qwen3_dir: Path) -> None:
    async with _engine(qwen3_dir, kv_tokens=2048) as engine:
        stream = engine.submit("a long story", SamplingParams(max_tokens=200, ignore_eos=True))
        seen = 0
        async for out in stream:
            seen += 1
            if seen == 3:
                engine.abort(stream.request_id)
            if out.finished:
                assert out.finish_reason == "abort"
        assert 3 <= seen < 200
        await asyncio.sleep(0)
        assert_clean(engine)


async def test_leaving_generate_early_aborts(qwen3_dir: Path) -> None:
    async with _engine(qwen3_dir, kv_tokens=2048) as engine:
        agen = engine.generate("tell me", SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(100):
            if not engine.core.running and not engine.core.waiting:
                break
            await asyncio.sleep(0.01)
        assert_clean(engine)


async def test_bad_input_is_refused_and_nothing_else_is_lost(qwen3_dir: Path) -> None:
    async with _engine(qwen3_dir, kv_tokens=2048, max_model_len=64) as engine:
        good = engine.submit("fine prompt", SamplingParams(max_tokens=5, ignore_eos=True))
        with pytest.raises(ValueError, match="empty"):
            engine.submit("", SamplingParams())
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([1, 2, 10**9], SamplingParams())
        with pytest.raises(ValueError, match="limit is 63"):
            engine.submit(list(range(3, 70)), SamplingParams())
        # Built in Python, SamplingParams skips the checks decoding makes; submit makes them,
        # so a bad value fails its own request, not the batch step it would land in.
        with pytest.raises(ValueError, match="top_p"):
            engine.submit("x", SamplingParams(top_p=0.0))
        with pytest.raises(ValueError, match="seed"):
            engine.submit("x", SamplingParams(seed=2**70))
        result = await collect(good)
        again = await collect(engine.submit("fine prompt", SamplingParams(max_tokens=5)))
        assert_clean(engine)
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert again.num_cached_tokens > 0


async def test_model_error_fails_only_that_step(
    qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _engine(qwen3_dir, kv_tokens=2048) as engine:
        real = engine.backend.forward
        calls = {"n": 0}

        def flaky(batch, kv):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return real(batch, kv)

        monkeypatch.setattr(engine.backend, "forward", flaky)
        failed = await collect(engine.submit("one", SamplingParams(max_tokens=3)))
        ok = await collect(engine.submit("two", SamplingParams(max_tokens=3, ignore_eos=True)))
        assert_clean(engine)
    assert failed.finish_reason == "error" and "boom" in (failed.error or "")
    assert ok.finish_reason == "length" and len(ok.token_ids) == 3


async def test_logprobs_and_prompt_logprobs(qwen3_dir: Path) -> None:
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=1)
    async with _engine(qwen3_dir, kv_tokens=2048, chunked_prefill_size=4) as engine:
        res = await collect(engine.submit("logprob test prompt", params))
        echo = await collect(
            engine.submit("logprob test prompt", SamplingParams(max_tokens=0, prompt_logprobs=0))
        )
    assert res.logprobs is not None and len(res.logprobs) == 3
    for lp in res.logprobs:
        assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
        assert lp.token_id == lp.top[0][0]  # greedy picks the top token
    n_prompt = res.num_prompt_tokens
    assert res.prompt_logprobs is not None and len(res.prompt_logprobs) == n_prompt
    assert res.prompt_logprobs[0] is None
    assert all(p is not None and p.logprob <= 0 for p in res.prompt_logprobs[1:])
    # max_tokens=0 (echo for log-likelihoods): same prompt log-probs, no output tokens.
    assert echo.token_ids == [] and echo.finish_reason == "length"
    assert echo.prompt_logprobs is not None
    got = [p.logprob for p in echo.prompt_logprobs[1:]]  # type: ignore[union-attr]
    want = [p.logprob for p in res.prompt_logprobs[1:]]  # type: ignore[union-attr]
    assert got == pytest.approx(want, abs=1e-5)


def test_generate_batch_and_closed_engine(qwen3_dir: Path) -> None:
    engine = _engine(qwen3_dir, kv_tokens=1024)
    results = engine.generate_batch(
        ["one", "two", [5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    )
    assert [len(r.token_ids) for r in results] == [4, 4, 4]
    assert results[0].text == engine.tokenizer.decode(results[0].token_ids)
    with pytest.raises(EngineClosedError):
        engine.submit("late", SamplingParams())


async def test_shutdown_aborts_what_does_not_finish(qwen3_dir: Path) -> None:
    engine = _engine(qwen3_dir, kv_tokens=2048)
    await engine.start()
    stream = engine.submit("forever", SamplingParams(max_tokens=100_000, ignore_eos=True))
    await engine.shutdown(timeout=0.2)
    result = await collect(stream)
    assert result.finish_reason in ("abort", "length")
    assert result.finish_reason == "abort"


async def test_gc_freeze_sets_the_collector_pace_and_off_leaves_it(qwen3_dir: Path) -> None:
    import gc

    from slmserve.engine.engine import GC_THRESHOLDS

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        async with Engine(EngineConfig(model=str(qwen3_dir), device="cpu", gc_freeze=False)):
            assert gc.get_threshold() == (700, 10, 10)
        async with Engine(EngineConfig(model=str(qwen3_dir), device="cpu")):
            assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)


def test_prompt_logprobs_of_a_preempted_request_are_not_repeated(qwen3_dir: Path) -> None:
    """A request preempted during its prompt computes it again; its prompt log-probabilities
    are those of an unpressed run, one per prompt token."""

    async def run(kv_tokens: int) -> tuple[list[float | None], int]:
        limits = {"kv_tokens": kv_tokens, "chunked_prefill_size": 16, "max_batch_tokens": 32}
        async with _engine(qwen3_dir, **limits) as engine:
            greedy = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
            others = [collect(engine.submit([10 + i] * 30, greedy)) for i in range(4)]
            params = SamplingParams(max_tokens=5, temperature=0.0, prompt_logprobs=0)
            mine = collect(engine.submit(list(range(20, 80)), params))
            *_, result = await asyncio.gather(*others, mine)
            assert engine.core is not None
            plp = result.prompt_logprobs or []
            return [p.logprob if p else None for p in plp], engine.core.num_preemptions

    roomy, none = asyncio.run(run(4096))
    pressed, preemptions = asyncio.run(run(200))
    assert none == 0 and preemptions > 0
    assert len(roomy) == 60 and roomy[0] is None
    assert pressed[0] is None and pressed[1:] == pytest.approx(roomy[1:], abs=1e-5)


@pytest.mark.parametrize("method", ["order", "on_arrival", "on_admit", "on_step"])
async def test_a_scheduler_that_raises_fails_what_it_ordered_not_the_engine(
    qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """The Scheduler contract: a policy bug fails the requests it concerns, and the engine
    keeps serving: ``order`` fails the waiting requests it was ordering, ``on_arrival`` refuses
    the request submitted, and the accounting calls are logged."""
    async with _engine(qwen3_dir, kv_tokens=1024) as engine:
        real, calls = getattr(engine.scheduler, method), {"n": 0}

        def buggy(*args: object) -> object:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("policy bug")
            return real(*args)

        monkeypatch.setattr(engine.scheduler, method, buggy)
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        if method == "on_arrival":
            with pytest.raises(RuntimeError, match="'fcfs' failed on the request's arrival"):
                engine.submit("first", params)
        else:
            first = await collect(engine.submit("first", params))
        second = await collect(engine.submit("second", params))
        assert calls["n"] >= 2 and engine.running
        await asyncio.sleep(0)
        assert_clean(engine)
    if method == "order":
        assert first.finish_reason == "error" and "policy bug" in (first.error or "")
        assert "'fcfs'" in (first.error or "")
    elif method != "on_arrival":
        assert first.finish_reason == "length" and len(first.token_ids) == 3
    assert second.finish_reason == "length" and len(second.token_ids) == 3
