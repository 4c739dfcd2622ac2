"""Clients that leave early: their engine requests are aborted and their KV is freed."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from slmserve import Engine, EngineConfig
from slmserve.plugins import PluginManager
from slmserve.server import create_app
from slmserve.server.keys import ENGINE

Client = TestClient[web.Request, web.Application]
FOREVER = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="session")
def demo_backend() -> Any:
    return PluginManager(load_entrypoints=False).backends.get("native")(
        None, device="cpu", dtype="float32"
    )


@pytest.fixture(params=[True, False], ids=["cancel-handler", "write-fails"])
async def client(aiohttp_client: Any, demo_backend: Any, request: Any) -> Client:
    """Both ways a server learns of a hang-up: its handler is cancelled (as ``slmserve serve``
    runs it), or — with cancellation off, aiohttp's default — the next write fails."""
    engine = Engine(EngineConfig(kv_tokens=4096, gc_freeze=False), backend=demo_backend)
    server_kwargs = {"handler_cancellation": request.param}
    return await aiohttp_client(create_app(engine), server_kwargs=server_kwargs)


async def assert_engine_clean(engine: Engine) -> None:
    """Wait for the aborts to land, then: nothing queued, nothing locked, every slot accounted."""
    core = engine.core
    assert core is not None
    for _ in range(500):
        if not core.running and not core.waiting:
            break
        await asyncio.sleep(0.01)
    assert not core.running and not core.waiting
    core.check_integrity()
    assert core.cache.protected_size == 0
    assert engine.kv.allocator.num_free + core.cache.total_size == engine.kv.num_slots


async def finished_by_reason(client: Client) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = await (await client.get("/metrics")).text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "slmserve:request_success":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["finished_reason"]] = sample.value
    return out


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "a long story", "n": 1}),
        ("/v1/completions", {"prompt": ["one", "two"], "n": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "go"}], "n": 1}),
    ],
)
async def test_disconnect_mid_stream_aborts(
    client: Client, path: str, body: dict[str, Any]
) -> None:
    engine: Engine = client.app[ENGINE]  # type: ignore[index,assignment]
    resp = await client.post(path, json={**body, **FOREVER, "stream": True})
    assert resp.status == 200
    for _ in range(4):
        event = await resp.content.readuntil(b"\n\n")
        assert event.startswith(b"data: {")
    assert engine.core is not None and engine.core.running
    resp.close()  # hang up mid-stream
    await assert_engine_clean(engine)
    reasons = await finished_by_reason(client)
    expected = 4 if isinstance(body.get("prompt"), list) else 1
    assert reasons == {"abort": expected}


async def test_disconnect_while_waiting_for_a_whole_response(
    aiohttp_client: Any, demo_backend: Any
) -> None:
    engine = Engine(EngineConfig(kv_tokens=4096, gc_freeze=False), backend=demo_backend)
    client = await aiohttp_client(create_app(engine), server_kwargs={"handler_cancellation": True})
    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            "/v1/completions",
            json={"prompt": "never read", **FOREVER},
            timeout=aiohttp.ClientTimeout(total=0.5),
        )
    await assert_engine_clean(engine)
    assert await finished_by_reason(client) == {"abort": 1}


@pytest.mark.parametrize("client", [False], indirect=True, ids=["write-fails"])
async def test_stream_survives_a_slow_reader(client: Client) -> None:
    resp = await client.post(
        "/v1/completions",
        json={"prompt": "slow", "max_tokens": 30, "ignore_eos": True, "stream": True},
    )
    await asyncio.sleep(0.3)  # let the server run ahead of us
    text = await resp.text()
    assert text.endswith("data: [DONE]\n\n") and text.count("data: {") >= 1
    await assert_engine_clean(client.app[ENGINE])  # type: ignore[index]
