"""The OpenAI-compatible endpoints over HTTP (pytest-aiohttp), on the embedded demo model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from slmserve import Engine, EngineConfig, SamplingParams, hookimpl
from slmserve.engine import collect
from slmserve.plugins import PluginManager
from slmserve.server import ServerConfig, create_app
from slmserve.server.keys import ENGINE

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_client(aiohttp_client: Any, demo_backend: Any) -> MakeClient:
    async def make(
        server: ServerConfig | None = None, plugins: PluginManager | None = None, **engine: Any
    ) -> Client:
        config = EngineConfig(kv_tokens=2048, gc_freeze=False, **engine)
        app = create_app(Engine(config, backend=demo_backend, plugins=plugins), server)
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


def engine_of(client: Client) -> Engine:
    return client.app[ENGINE]  # type: ignore[index,return-value]


async def sse_events(response: Any) -> list[Any]:
    """Parse a whole SSE body; the last event must be ``[DONE]``."""
    body = await response.text()
    events = [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


GREEDY = {"temperature": 0.0, "ignore_eos": True}


# ------------------------------------------------------------------------------ completions


async def test_completion_matches_the_engine(client: Client) -> None:
    body = {"model": "demo", "prompt": "Hello there", "max_tokens": 6, **GREEDY}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200
    data = await resp.json()
    engine = engine_of(client)
    ids = engine.tokenizer.encode("Hello there")
    direct = await collect(engine.submit(ids, SamplingParams(max_tokens=6, **GREEDY)))
    assert data["object"] == "text_completion" and data["model"] == "demo"
    assert data["id"].startswith("cmpl-")
    (choice,) = data["choices"]
    assert choice == {"index": 0, "text": direct.text, "logprobs": None, "finish_reason": "length"}
    assert data["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 6,
        "total_tokens": len(ids) + 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_prompt_shapes_and_n(client: Client) -> None:
    tok = engine_of(client).tokenizer
    a, b = tok.encode("first"), tok.encode("second prompt")
    shapes: list[Any] = ["first", ["first", "second prompt"], a, [a, b]]
    texts = []
    for prompt in shapes:
        body = {"prompt": prompt, "max_tokens": 3, "n": 2, **GREEDY}
        data = await (await client.post("/v1/completions", json=body)).json()
        num_prompts = 2 if isinstance(prompt[0], list | str) and not isinstance(prompt, str) else 1
        assert [c["index"] for c in data["choices"]] == list(range(2 * num_prompts))
        # Each prompt counts once however many choices it has.
        expected_prompt = len(a) + (len(b) if num_prompts == 2 else 0)
        assert data["usage"]["prompt_tokens"] == expected_prompt
        assert data["usage"]["completion_tokens"] == 3 * 2 * num_prompts
        texts.append([c["text"] for c in data["choices"]])
    # Text and token-id prompts give the same greedy output.
    assert texts[0] == texts[2] and texts[1] == texts[3]
    assert texts[1][0] == texts[0][0]


async def test_seeded_n_choices_differ_but_reproduce(client: Client) -> None:
    body = {"prompt": "seed", "max_tokens": 8, "n": 2, "seed": 7, "ignore_eos": True}
    first = await (await client.post("/v1/completions", json=body)).json()
    again = await (await client.post("/v1/completions", json=body)).json()
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]
    assert texts[0] != texts[1]


async def test_echo_logprobs_give_log_likelihoods(client: Client) -> None:
    prompt = "The quick brown fox"
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    data = await (await client.post("/v1/completions", json=body)).json()
    (choice,) = data["choices"]
    assert choice["text"] == prompt
    lp = choice["logprobs"]
    engine = engine_of(client)
    ids = engine.tokenizer.encode(prompt)
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    direct = await collect(engine.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=1)))
    want = [p.logprob for p in direct.prompt_logprobs[1:]]  # type: ignore[index,union-attr]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    assert lp["text_offset"] == list(range(len(prompt)))  # byte tokens: one char each
    assert data["usage"]["completion_tokens"] == 0


async def test_completion_logprobs_include_the_sampled_token(client: Client) -> None:
    body = {"prompt": "abc", "max_tokens": 4, "logprobs": 2, **GREEDY}
    data = await (await client.post("/v1/completions", json=body)).json()
    lp = data["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and token in top and 2 <= len(top) <= 3
        assert top[token] == pytest.approx(max(top.values()))  # greedy: the best token
    assert lp["text_offset"] == sorted(lp["text_offset"])


async def test_stop_penalties_and_client_id(make_client: MakeClient) -> None:
    client = await make_client(scheduler="vtc")
    full = await (
        await client.post("/v1/completions", json={"prompt": "xyz", "max_tokens": 10, **GREEDY})
    ).json()
    text = full["choices"][0]["text"]
    stop = text[3:5]
    body = {
        "prompt": "xyz",
        "max_tokens": 10,
        "stop": [stop],
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_k": 5,
        "top_p": 0.9,
        "min_p": 0.0,
        "user": "alice",
        **GREEDY,
    }
    data = await (await client.post("/v1/completions", json=body)).json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["choices"][0]["text"] == text[: text.find(stop)]
    await client.post(
        "/v1/completions",
        json={"prompt": "q", "max_tokens": 1, "user": "ignored"},
        headers={"X-Client-Id": "bob"},
    )
    clients = set()
    for per_client in engine_of(client).stats()["scheduler"].values():
        clients |= set(per_client)
    assert {"alice", "bob"} <= clients and "ignored" not in clients


async def test_streaming_completion(client: Client) -> None:
    body = {"prompt": "stream me", "max_tokens": 8, **GREEDY}
    whole = await (await client.post("/v1/completions", json=body)).json()
    resp = await client.post(
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    events = await sse_events(resp)
    *chunks, last = events
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    assert len({c["id"] for c in events}) == 1


async def test_streaming_echo_and_n(client: Client) -> None:
    body = {"prompt": "ab", "max_tokens": 3, "n": 2, "echo": True, "stream": True, **GREEDY}
    events = await sse_events(await client.post("/v1/completions", json=body))
    by_choice: dict[int, str] = {0: "", 1: ""}
    for event in events:
        (choice,) = event["choices"]
        by_choice[choice["index"]] += choice["text"]
    assert by_choice[0] == by_choice[1] and by_choice[0].startswith("ab")


# ------------------------------------------------------------------------------ chat

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]},
]


async def test_chat_completion_uses_the_template(client: Client) -> None:
    body = {"model": "demo", "messages": MESSAGES, "max_completion_tokens": 5, **GREEDY}
    data = await (await client.post("/v1/chat/completions", json=body)).json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    engine = engine_of(client)
    text = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    direct = await collect(engine.submit(ids, SamplingParams(max_tokens=5, **GREEDY)))
    assert choice["message"]["content"] == direct.text
    assert data["usage"]["prompt_tokens"] == len(ids)
    tokenized = await (await client.post("/tokenize", json={"messages": MESSAGES})).json()
    assert tokenized["tokens"] == ids


async def test_chat_logprobs(client: Client) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, **GREEDY}
    data = await (await client.post("/v1/chat/completions", json=body)).json()
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for item in content:
        assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 2
        assert item["top_logprobs"][0]["token"] == item["token"]
        assert item["bytes"] == list(item["token"].encode())


async def test_chat_streaming_has_role_then_content(client: Client) -> None:
    body = {"messages": MESSAGES, "max_tokens": 6, **GREEDY}
    whole = await (await client.post("/v1/chat/completions", json=body)).json()
    stream_body = {
        **body,
        "stream": True,
        "logprobs": True,
        "stream_options": {"include_usage": True},
    }
    events = await sse_events(await client.post("/v1/chat/completions", json=stream_body))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    chunks = [e for e in events[1:] if e["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks) == 6
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6


# ------------------------------------------------------------------------------ the rest


async def test_models_say_the_weights_are_random(client: Client) -> None:
    data = await (await client.get("/v1/models")).json()
    (card,) = data["data"]
    assert data["object"] == "list" and card["id"] == "demo" and card["object"] == "model"
    assert card["random_weights"] is True and "RANDOM" in card["description"]
    assert card["max_model_len"] == 2048
    assert (await (await client.get("/v1/models/demo")).json())["id"] == "demo"


async def test_served_model_name(make_client: MakeClient) -> None:
    client = await make_client(ServerConfig(served_model_name="tiny"))
    assert (await (await client.get("/v1/models")).json())["data"][0]["id"] == "tiny"
    ok = await client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 1}
    )
    assert ok.status == 200


async def test_tokenize_detokenize_round_trip(client: Client) -> None:
    data = await (await client.post("/tokenize", json={"prompt": "héllo"})).json()
    assert data["count"] == len(data["tokens"]) == 6 and data["max_model_len"] == 2048
    back = await (await client.post("/detokenize", json={"tokens": data["tokens"]})).json()
    assert back == {"prompt": "héllo"}


async def test_health_and_ready(client: Client) -> None:
    assert (await (await client.get("/health")).json()) == {"status": "ok"}
    assert (await (await client.get("/ready")).json()) == {"status": "ready"}


async def test_plugins_add_routes(aiohttp_client: Any, demo_backend: Any) -> None:
    class Routes:
        @hookimpl
        def slmserve_add_routes(self, app: web.Application, engine: Any) -> None:
            async def hello(request: web.Request) -> web.Response:
                return web.json_response({"running": engine.running})

            app.router.add_get("/hello", hello)

    plugins = PluginManager(load_entrypoints=False, extra_plugins=(Routes(),))
    engine = Engine(
        EngineConfig(kv_tokens=256, gc_freeze=False), backend=demo_backend, plugins=plugins
    )
    client = await aiohttp_client(create_app(engine))
    assert (await (await client.get("/hello")).json()) == {"running": True}


async def test_concurrent_requests_all_complete(client: Client) -> None:
    async def one(i: int) -> str:
        body = {"prompt": f"request {i}", "max_tokens": 4, **GREEDY}
        data = await (await client.post("/v1/completions", json=body)).json()
        return str(data["choices"][0]["finish_reason"])

    assert await asyncio.gather(*(one(i) for i in range(16))) == ["length"] * 16
