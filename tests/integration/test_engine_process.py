"""The engine in a child process (``ProcessEngine``): same results and errors as in-process,
aborts and shutdown across the process boundary, and a child that dies fails loudly.

Slow: every test starts a child process that imports torch and builds the demo model.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
from prometheus_text import parse_samples

from slmserve import EngineConfig, SamplingParams
from slmserve.engine import AsyncEngine, EngineClosedError, QueueFullError, collect
from slmserve.server import create_app
from slmserve.server.engine_process import ProcessEngine

pytestmark = pytest.mark.slow

CONFIG = EngineConfig(kv_tokens=2048, gc_freeze=False)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
PROMPTS = ["The cat", "A longer prompt about engines and processes", "x"]
LABELS = [5, 6]


async def until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_same_results_errors_aborts_and_drain_as_in_process(demo_backend: Any) -> None:
    async with AsyncEngine(CONFIG, backend=demo_backend) as local:
        expected = [await collect(local.submit(p, GREEDY)) for p in PROMPTS]
        expected_scores = await local.score(
            "Is it relevant? ", ["yes", "no"], label_token_ids=LABELS
        )

    async with ProcessEngine(CONFIG) as remote:
        assert remote.pid is not None and remote.pid != os.getpid()
        assert remote.max_model_len == 2048 and remote.kv_slots == 2048
        results = await asyncio.gather(*(collect(remote.submit(p, GREEDY)) for p in PROMPTS))
        assert [r.token_ids for r in results] == [e.token_ids for e in expected]
        assert [r.text for r in results] == [e.text for e in expected]
        scores = await remote.score("Is it relevant? ", ["yes", "no"], label_token_ids=LABELS)
        for got, want in zip(scores.scores, expected_scores.scores, strict=True):
            assert got == pytest.approx(want, abs=1e-5)

        # Errors keep their types across the boundary (the server maps them to 400/429/503).
        with pytest.raises(ValueError, match="items is empty"):
            await remote.score("q", [], label_token_ids=LABELS)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            remote.submit([1, 10**9], GREEDY)
        with pytest.raises(ValueError, match="limit is 2047"):
            remote.submit([1] * 2048, GREEDY)

        # An abort reaches the child and frees the request there.
        stream = remote.submit("abort me", LONG)
        first = await stream.__anext__()
        assert first.finish_reason is None
        remote.abort(stream.request_id)
        last = [out async for out in stream][-1]
        assert last.finish_reason == "abort"
        metrics = parse_samples(await remote.metrics_text())
        assert metrics[("slmserve:request_success_total", (("finished_reason", "abort"),))] == 1
        assert metrics[("slmserve:num_requests_running", ())] == 0

        # Shutdown drains: a running request finishes; new ones are refused meanwhile.
        running = asyncio.ensure_future(collect(remote.submit("drain me", GREEDY)))
        await asyncio.sleep(0)  # let the submit go out
        stopping = asyncio.ensure_future(remote.shutdown(timeout=30))
        await asyncio.sleep(0)
        with pytest.raises(EngineClosedError):
            remote.submit("too late", GREEDY)
        assert (await running).finish_reason == "length"
        await stopping
        assert not remote.running


async def test_queue_bound_in_the_front_and_the_engine_pinned_to_its_cpus() -> None:
    config = CONFIG.replace(max_waiting_requests=1, max_running_requests=1)
    last_cpu = max(os.sched_getaffinity(0))
    async with ProcessEngine(config, cpus={last_cpu}) as remote:
        assert remote.pid is not None and os.sched_getaffinity(remote.pid) == {last_cpu}
        streams = [remote.submit("one", LONG), remote.submit("two", LONG)]
        with pytest.raises(QueueFullError, match="limit is 2"):
            remote.submit("three", LONG)
        for s in streams:
            remote.abort(s.request_id)
        for s in streams:
            assert (await collect(s)).finish_reason == "abort"
        assert (await collect(remote.submit("now it fits", GREEDY))).finish_reason == "length"


async def test_server_over_a_child_and_a_child_that_dies(aiohttp_client: Any) -> None:
    engine = ProcessEngine(CONFIG)
    client = await aiohttp_client(create_app(engine))
    body = {"prompt": "hello", "max_tokens": 3, "ignore_eos": True, "user": "alice"}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["usage"]["completion_tokens"] == 3

    # A client that hangs up mid-stream aborts its request in the child.
    stream_body = {**body, "max_tokens": 400, "stream": True}
    resp = await client.post("/v1/completions", json=stream_body)
    assert resp.status == 200
    await resp.content.readline()
    resp.close()

    async def aborted() -> bool:
        m = parse_samples(await (await client.get("/metrics")).text())
        return m.get(("slmserve:request_success_total", (("finished_reason", "abort"),))) == 1

    await until(aborted)
    m = parse_samples(await (await client.get("/metrics")).text())
    assert m[("slmserve:request_success_total", (("finished_reason", "length"),))] == 1
    assert m[("slmserve:num_requests_running", ())] == 0

    # The child dies with a request running: the request fails loudly, the server says so.
    resp = await client.post("/v1/completions", json=stream_body)
    assert resp.status == 200
    await resp.content.readline()
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    rest = (await resp.read()).decode()
    assert "the engine process stopped" in rest
    assert (await client.get("/health")).status == 503
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "shutting_down"


async def test_values_the_wire_cannot_carry_fail_alone() -> None:
    """A value msgpack cannot encode (an integer beyond 64 bits) or bad sampling parameters
    are refused for their own request only: the requests sent in the same event-loop turn
    complete, nothing hangs, and the engine process keeps running."""
    async with ProcessEngine(CONFIG) as remote:
        with pytest.raises(ValueError, match="seed"):
            remote.submit("x", SamplingParams(seed=2**70))
        with pytest.raises(ValueError, match="top_p"):
            remote.submit("x", SamplingParams(top_p=0.0))
        bad_score = asyncio.ensure_future(remote.score([2**70], ["yes"], label_token_ids=LABELS))
        await asyncio.sleep(0)  # the score call is queued; the frame goes out after this turn
        good = asyncio.ensure_future(collect(remote.submit("The cat", GREEDY)))  # same frame
        with pytest.raises(ValueError, match="cannot be sent to the engine process"):
            await asyncio.wait_for(bad_score, 30)
        result = await asyncio.wait_for(good, 30)
        assert result.finish_reason == "length" and len(result.token_ids) == 6
        assert remote.running
        again = await collect(remote.submit("The cat", GREEDY))
        assert again.token_ids == result.token_ids


async def test_a_cancelled_score_call_stops_in_the_child_too() -> None:
    async with ProcessEngine(CONFIG) as remote:
        items = [f"item {i} " * 12 for i in range(3000)]  # many seconds of work
        task = asyncio.ensure_future(remote.score("query: ", items, label_token_ids=LABELS))

        async def queued() -> bool:
            m = parse_samples(await remote.metrics_text())
            return m.get(("slmserve:num_requests_waiting", ()), 0.0) > 0

        await until(queued)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async def drained() -> bool:
            m = parse_samples(await remote.metrics_text())
            return not any(
                v for (name, _), v in m.items()
                if name in ("slmserve:num_requests_waiting", "slmserve:num_requests_running")
            )  # fmt: skip

        await until(drained, timeout=2.0)
        ok = await remote.score("query: ", items[:2], label_token_ids=LABELS)
        assert len(ok.scores) == 2
