"""``GET /metrics``: vLLM-like names under ``slmserve:``, one registry per application."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_text import Samples, parse_samples

from slmserve import Engine, EngineConfig
from slmserve.plugins import PluginManager
from slmserve.server import create_app
from slmserve.server.keys import ENGINE, METRICS


@pytest.fixture(scope="session")
def demo_backend() -> Any:
    return PluginManager(load_entrypoints=False).backends.get("native")(
        None, device="cpu", dtype="float32"
    )


def new_app(backend: Any, **engine: Any) -> Any:
    config = EngineConfig(kv_tokens=2048, gc_freeze=False, **engine)
    return create_app(Engine(config, backend=backend))


async def scrape(client: TestClient) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    return parse_samples(await resp.text())


async def test_metrics_after_traffic(aiohttp_client: Any, demo_backend: Any) -> None:
    client = await aiohttp_client(new_app(demo_backend, scheduler="vtc"))
    body = {"prompt": "metrics please", "max_tokens": 4, "ignore_eos": True, "user": "alice"}
    for _ in range(3):
        assert (await client.post("/v1/completions", json=body)).status == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "ignore_eos": True}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200
    m = await scrape(client)
    prompt_len = len(client.app[ENGINE].tokenizer.encode("metrics please"))

    assert m[("slmserve:num_requests_running", ())] == 0
    assert m[("slmserve:num_requests_waiting", ())] == 0
    assert 0 < m[("slmserve:kv_cache_usage_perc", ())] <= 1
    assert m[("slmserve:kv_cache_capacity_tokens", ())] == 2048
    assert m[("slmserve:request_success_total", (("finished_reason", "length"),))] == 4
    assert m[("slmserve:generation_tokens_total", ())] == 3 * 4 + 2
    # The same prompt three times: the second and third hit the prefix cache.
    assert m[("slmserve:prefix_cache_hits_total", ())] >= 2 * (prompt_len - 1)
    assert m[("slmserve:prefix_cache_queries_total", ())] >= 3 * prompt_len
    assert m[("slmserve:prompt_tokens_total", ())] >= 3 * prompt_len
    assert (
        m[("slmserve:prefill_tokens_computed_total", ())] < m[("slmserve:prompt_tokens_total", ())]
    )
    assert m[("slmserve:num_preemptions_total", ())] == 0
    for hist in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "inter_token_latency_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert m[(f"slmserve:{hist}_count", ())] == 4, hist
    assert m[("slmserve:request_generation_tokens_sum", ())] == 14
    series = {labels for name, labels in m if name == "slmserve:scheduler_client_stat"}
    assert any(("client", "alice") in labels for labels in series)


async def test_each_app_has_its_own_registry(aiohttp_client: Any, demo_backend: Any) -> None:
    first = await aiohttp_client(new_app(demo_backend))
    second = await aiohttp_client(new_app(demo_backend))
    await first.post("/v1/completions", json={"prompt": "only first", "max_tokens": 1})
    one, two = await scrape(first), await scrape(second)
    assert one[("slmserve:e2e_request_latency_seconds_count", ())] == 1
    assert two[("slmserve:e2e_request_latency_seconds_count", ())] == 0
    assert first.app[METRICS].registry is not second.app[METRICS].registry


async def test_hook_is_detached_when_the_app_stops(aiohttp_client: Any, demo_backend: Any) -> None:
    app = new_app(demo_backend)
    client = await aiohttp_client(app)
    engine = app[ENGINE]
    names = lambda: {n for n, _ in engine.plugins.pm.list_name_plugin()}  # noqa: E731
    assert any(n.startswith("slmserve-server-metrics") for n in names())
    await client.close()
    assert not any(n.startswith("slmserve-server-metrics") for n in names())


def test_batched_histogram_matches_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same buckets, count and sum as prometheus-client's Histogram, boundaries included,
    whether values are flushed at scrape time or every FLUSH_EVERY observations."""
    import random

    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.exposition import generate_latest

    from slmserve.server.metrics import TTFT_BUCKETS, BatchedHistogram

    monkeypatch.setattr(BatchedHistogram, "FLUSH_EVERY", 7)
    rng = random.Random(0)
    values = [rng.choice(TTFT_BUCKETS) for _ in range(30)]  # exactly on a bound: le is inclusive
    values += [rng.expovariate(5.0) for _ in range(200)] + [0.0, 1e9]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batched = BatchedHistogram("slmserve:h", "doc", TTFT_BUCKETS, "m")
    ours.register(batched)
    reference = Histogram(
        "slmserve:h", "doc", ["model_name"], buckets=TTFT_BUCKETS, registry=theirs
    )
    for v in values:
        batched.observe(v)
        reference.labels("m").observe(v)

    def series(registry: CollectorRegistry) -> dict[Any, float]:
        return {
            k: v
            for k, v in parse_samples(generate_latest(registry)).items()
            if not k[0].endswith("_created")
        }

    assert series(ours) == pytest.approx(series(theirs))
    assert series(ours)[("slmserve:h_count", ())] == len(values)
