"""Every failure becomes the OpenAI error body with the right status; none disturbs others."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect
from slmserve.server import ServerConfig, create_app
from slmserve.server.keys import ENGINE, SERVING

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_client(aiohttp_client: Any, demo_backend: Any) -> MakeClient:
    async def make(server: ServerConfig | None = None, **engine: Any) -> Client:
        config = EngineConfig(kv_tokens=1024, gc_freeze=False, **engine)
        app = create_app(Engine(config, backend=demo_backend), server)
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def expect_error(
    resp: Any, status: int, *, param: str | None = None, code: str | None = None
) -> str:
    """Assert the OpenAI error shape and return the message."""
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return str(error["message"])


# ------------------------------------------------------------------------------ 400


async def test_malformed_json(client: Client) -> None:
    resp = await client.post("/v1/completions", data=b'{"prompt": "hi",')
    assert "not valid JSON" in await expect_error(resp, 400)
    resp = await client.post("/v1/chat/completions", data=b"[]")
    assert "Expected `object`" in await expect_error(resp, 400)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"prompt": "hi", "temperature": -1}, "temperature", ">= 0.0"),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens", "Expected `int | null`"),
        ({"prompt": "hi", "top_p": 0}, "top_p", "> 0.0"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs", "<= 20"),
        ({"prompt": "hi", "n": 0}, "n", ">= 1"),
        ({"prompt": "hi", "stop": ""}, "stop", "length >= 1"),
        ({"prompt": "hi", "top_k": -2}, "top_k", ">= -1"),
        ({"prompt": 5}, "prompt", "got `int`"),
        ({"max_tokens": 3}, None, "missing required field `prompt`"),
        ({"prompt": ["a", 1]}, "prompt", "not a mix"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": [1, 2, 100000]}, "prompt", "outside the vocabulary"),
        ({"prompt": [[1], [2, -1]]}, "prompt[1]", "outside the vocabulary"),
        ({"prompt": "hi", "logit_bias": {"1": 2.0}}, "logit_bias", "not supported"),
        ({"prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
        ({"prompt": "hi", "n": 200}, "n", "limit is 128"),
    ],
)
async def test_invalid_completion_fields(
    client: Client, body: dict[str, Any], param: str | None, fragment: str
) -> None:
    message = await expect_error(await client.post("/v1/completions", json=body), 400, param=param)
    assert fragment in message


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": []}, "messages", "length >= 1"),
        ({"messages": [{"content": "x"}]}, "messages[0]", "missing required field `role`"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "got `int`"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
            "only text",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
            "needs `logprobs: true`",
        ),
    ],
)
async def test_invalid_chat_fields(
    client: Client, body: dict[str, Any], param: str | None, fragment: str
) -> None:
    resp = await client.post("/v1/chat/completions", json=body)
    assert fragment in await expect_error(resp, 400, param=param)


async def test_context_length(make_client: MakeClient) -> None:
    client = await make_client(max_model_len=64)
    resp = await client.post("/v1/completions", json={"prompt": "x" * 20, "max_tokens": 50})
    message = await expect_error(resp, 400, param="max_tokens", code="context_length_exceeded")
    assert "64 tokens" in message and "70 tokens" in message
    resp = await client.post("/v1/completions", json={"prompt": "x" * 64})
    await expect_error(resp, 400, param="prompt", code="context_length_exceeded")
    short = {"messages": [{"role": "user", "content": "y"}], "max_completion_tokens": 500}
    resp = await client.post("/v1/chat/completions", json=short)
    await expect_error(resp, 400, param="max_completion_tokens", code="context_length_exceeded")
    chat = {"messages": [{"role": "user", "content": "y" * 70}]}
    await expect_error(
        await client.post("/v1/chat/completions", json=chat),
        400,
        param="prompt",
        code="context_length_exceeded",
    )
    # Without max_tokens the default (16) is clamped to what fits.
    resp = await client.post("/v1/completions", json={"prompt": "x" * 60, "ignore_eos": True})
    assert (await resp.json())["usage"]["completion_tokens"] == 4


async def test_tokenize_errors(client: Client) -> None:
    await expect_error(await client.post("/tokenize", json={}), 400, param="prompt")
    await expect_error(
        await client.post("/detokenize", json={"tokens": [1, 99999]}), 400, param="tokens"
    )


# ---------------------------------------------------------------- 401 / 404 / 405 / 413


async def test_api_key(make_client: MakeClient) -> None:
    client = await make_client(ServerConfig(api_key="s3cret"))
    body = {"prompt": "a", "max_tokens": 1}
    await expect_error(await client.post("/v1/completions", json=body), 401, code="invalid_api_key")
    wrong = {"Authorization": "Bearer nope"}
    await expect_error(await client.get("/v1/models", headers=wrong), 401)
    await expect_error(await client.get("/v1/models", headers={"Authorization": "s3cret"}), 401)
    right = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/v1/completions", json=body, headers=right)).status == 200
    for open_path in ("/health", "/ready", "/metrics"):
        assert (await client.get(open_path)).status == 200


async def test_unknown_route_model_and_method(client: Client) -> None:
    await expect_error(await client.get("/v1/nothing"), 404)
    resp = await client.post("/v1/completions", json={"model": "gpt-9", "prompt": "a"})
    assert "gpt-9" in await expect_error(resp, 404, param="model", code="model_not_found")
    await expect_error(await client.get("/v1/models/gpt-9"), 404, param="model")
    chat = {"model": "x", "messages": [{"role": "user", "content": "a"}]}
    await expect_error(await client.post("/v1/chat/completions", json=chat), 404, param="model")
    await expect_error(await client.get("/v1/completions"), 405, code="method_not_allowed")


async def test_body_too_large(make_client: MakeClient) -> None:
    client = await make_client(ServerConfig(max_body_bytes=1000))
    resp = await client.post("/v1/completions", json={"prompt": "x" * 2000})
    await expect_error(resp, 413, code="request_too_large")
    ok = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert ok.status == 200


# ------------------------------------------------------------------------------ 429 / 503 / 500


async def test_queue_full_is_429(make_client: MakeClient) -> None:
    client = await make_client(max_running_requests=1, max_waiting_requests=1)
    engine: Engine = client.app[ENGINE]  # type: ignore[index,assignment]
    forever = SamplingParams(max_tokens=1000, ignore_eos=True)
    running = engine.submit("running", forever)
    await running.__anext__()  # admitted: the only running slot is taken
    waiting = engine.submit("waiting", forever)
    resp = await client.post("/v1/completions", json={"prompt": "one more", "max_tokens": 1})
    assert "max_waiting_requests=1" in await expect_error(resp, 429, code="queue_full")
    engine.abort(running.request_id)
    engine.abort(waiting.request_id)
    assert (await collect(waiting)).finish_reason == "abort"


async def test_shutting_down_is_503(client: Client) -> None:
    serving = client.app[SERVING]  # type: ignore[index]
    serving.draining = True
    await expect_error(await client.get("/ready"), 503, code="shutting_down")
    assert (await client.get("/health")).status == 200
    await client.app[ENGINE].shutdown()  # type: ignore[index]
    resp = await client.post("/v1/completions", json={"prompt": "late", "max_tokens": 1})
    await expect_error(resp, 503, code="shutting_down")
    chat = {"messages": [{"role": "user", "content": "late"}], "stream": True}
    await expect_error(await client.post("/v1/chat/completions", json=chat), 503)


async def test_unexpected_error_is_a_bare_500(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    serving = client.app[SERVING]  # type: ignore[index]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(serving, "chat_prompt", broken)
    resp = await client.post("/v1/chat/completions", json={"messages": [{"role": "u"}]})
    message = await expect_error(resp, 500)
    assert "secret" not in message
    assert "secret internals" in caplog.text  # logged for the operator


async def test_generation_failure_is_reported(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine: Engine = client.app[ENGINE]  # type: ignore[index,assignment]

    def boom(batch: Any, kv: Any) -> Any:
        raise RuntimeError("device on fire")

    monkeypatch.setattr(engine.backend, "forward", boom)
    resp = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert "device on fire" in await expect_error(resp, 500)
    resp = await client.post(
        "/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True}
    )
    body = await resp.text()
    assert "device on fire" in body and body.endswith("data: [DONE]\n\n")


async def test_bad_requests_do_not_disturb_others(client: Client) -> None:
    good = {"prompt": "steady", "max_tokens": 20, "temperature": 0.0, "ignore_eos": True}
    alone = await (await client.post("/v1/completions", json=good)).json()

    async def noise() -> None:
        for body in ({"prompt": 1}, {"prompt": "x", "max_tokens": 5000}, {"prompt": [10**6]}):
            assert (await client.post("/v1/completions", json=body)).status == 400
        assert (await client.post("/v1/completions", data=b"{")).status == 400

    crowded, *_ = await asyncio.gather(
        client.post("/v1/completions", json={**good, "stream": True}),
        *(noise() for _ in range(5)),
    )
    text = await crowded.text()
    assert text.endswith("data: [DONE]\n\n")
    pieces = [line for line in text.split("\n\n") if line.startswith("data: {")]
    streamed = "".join(json.loads(p[6:])["choices"][0]["text"] for p in pieces)
    assert streamed == alone["choices"][0]["text"]
