"""``POST /v1/score`` over HTTP: scores equal the engine's (and transformers'), every 400."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient
from checkpoints import load_hf

from slmserve import Engine, EngineConfig
from slmserve.server import ServerConfig, create_app
from slmserve.server.keys import ENGINE

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

LABELS = [89, 78]  # "Y", "N" in the byte tokenizer
QUERY = "Query: senior python engineer, remote. "
ITEMS = ["Job: python developer", "Job: chef in a busy kitchen, evenings " * 3, "x", "Job: SRE"]


@pytest.fixture
def make_client(aiohttp_client: Any, demo_backend: Any) -> MakeClient:
    async def make(server: ServerConfig | None = None, **engine: Any) -> Client:
        config = EngineConfig(kv_tokens=2048, gc_freeze=False, **engine)
        backend = None if "model" in engine else demo_backend
        return await aiohttp_client(create_app(Engine(config, backend=backend), server))

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


def close(got: list[list[float]], want: list[list[float]], tol: float = 1e-4) -> bool:
    """Row by row within ``tol`` (``pytest.approx`` does not nest)."""
    return len(got) == len(want) and all(g == pytest.approx(w, abs=tol) for g, w in zip(got, want))


async def score(client: Client, **body: Any) -> tuple[int, Any]:
    resp = await client.post("/v1/score", json={"query": QUERY, "items": ITEMS, **body})
    return resp.status, await resp.json()


async def test_scores_equal_the_engine_and_share_the_prefix(client: Client) -> None:
    status, data = await score(client, label_token_ids=LABELS, model="demo")
    assert status == 200, data
    engine = client.app[ENGINE]
    direct = await engine.score(QUERY, ITEMS, label_token_ids=LABELS)
    assert data["object"] == "scoring" and data["model"] == "demo"
    assert len(data["scores"]) == len(ITEMS)
    for got, want in zip(data["scores"], direct.scores):
        assert got == pytest.approx(want, abs=1e-4)
    usage = data["usage"]
    assert usage["prompt_tokens"] == direct.prompt_tokens == usage["total_tokens"]
    q = len(engine.tokenizer.encode(QUERY, add_special_tokens=False))
    assert usage["cached_tokens"] >= (q - 1) * len(ITEMS)  # the query was computed once
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["cached_tokens"]}
    assert usage["compression_ratio"] == 1.0


async def test_labels_raw_logprobs_item_first_template_and_ids(client: Client) -> None:
    engine = client.app[ENGINE]
    status, by_text = await score(client, labels=["Y", "N"], apply_softmax=False)
    assert status == 200, by_text
    raw = await engine.score(QUERY, ITEMS, label_token_ids=LABELS, apply_softmax=False)
    assert close(by_text["scores"], raw.scores)
    status, first = await score(client, label_token_ids=LABELS, item_first=True, user="u1")
    want = await engine.score(QUERY, ITEMS, label_token_ids=LABELS, item_first=True)
    assert status == 200 and close(first["scores"], want.scores)
    template = "Is {item} a match for {query}? "
    status, templ = await score(client, label_token_ids=LABELS, template=template)
    want = await engine.score(QUERY, ITEMS, label_token_ids=LABELS, template=template)
    assert status == 200 and close(templ["scores"], want.scores)
    body = {"query": [70, 71, 72], "items": [[73, 74], [75]], "label_token_ids": LABELS}
    resp = await client.post("/v1/score", json=body, headers={"X-Client-Id": "c"})
    want = await engine.score([70, 71, 72], [[73, 74], [75]], label_token_ids=LABELS)
    assert close((await resp.json())["scores"], want.scores)
    status, single = await score(client, items="one item", label_token_ids=LABELS)
    assert status == 200 and len(single["scores"]) == 1


async def test_server_default_template(make_client: MakeClient) -> None:
    template = "Q: {query}\nA: {item}\nMatch? "
    client = await make_client(ServerConfig(score_template=template))
    status, data = await score(client, label_token_ids=LABELS)
    want = await client.app[ENGINE].score(QUERY, ITEMS, label_token_ids=LABELS, template=template)
    assert status == 200 and close(data["scores"], want.scores)


async def test_compressor_chain_reports_the_ratio(client: Client) -> None:
    long_item = "Job: cook. " * 20 + "Needs python and remote work. " + "Kitchen duties. " * 20
    chain = [
        {"name": "extractive", "options": {"max_tokens": 60}},
        {"name": "truncate", "options": {"max_tokens": 40}},
    ]
    status, data = await score(
        client, items=[long_item, "short"], label_token_ids=LABELS, compressor=chain
    )
    assert status == 200, data
    assert data["usage"]["compression_ratio"] > 5
    engine = client.app[ENGINE]
    tok = engine.tokenizer
    from slmserve.compressors.extractive import Extractive
    from slmserve.compressors.truncate import Truncate

    text = Extractive(max_tokens=60).compress(long_item, query=QUERY, tokenizer=tok)
    text = Truncate(max_tokens=40).compress(text, query=QUERY, tokenizer=tok)
    assert "python" in text
    want = await engine.score(QUERY, [text, "short"], label_token_ids=LABELS)
    assert close(data["scores"], want.scores)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"items": []}, "items", "`items` is empty"),
        ({"items": ["a", ""]}, "items[1]", "item 1 is empty"),
        ({"items": ["a"] * 5}, "items", "limit is 4 per request"),
        ({"items": ["a", "b" * 101]}, "items[1]", "item 1 has 101 characters"),
        ({"items": ["a", "b" * 20, "c" * 31]}, "items[2]", "item 2 has 31 tokens"),
        ({"items": ["a", [1, 2]]}, "items[1]", "both be text"),
        ({"label_token_ids": [89, 10**6]}, "label_token_ids", "outside the vocabulary"),
        ({"label_token_ids": None}, "label_token_ids", "`label_token_ids` or `labels`"),
        ({"labels": ["Yes", "N"], "label_token_ids": None}, "labels[0]", "exactly one token"),
        ({"labels": ["Y"]}, "labels", "not both"),
        (
            {"compressor": {"name": "nope"}},
            "compressor",
            "valid names: extractive, summary, truncate",
        ),
        ({"compressor": {"name": "truncate", "options": {"bogus": 1}}}, "compressor", "bogus"),
        ({"compressor": {"name": "truncate", "options": {"max_tokens": 0}}}, "compressor", "max_"),
        ({"template": "{query}"}, None, "{item} exactly once"),
        ({"query": [70], "items": [[1, 99999]]}, "items[0]", "outside the vocabulary"),
        ({"query": [70], "items": [[1]], "compressor": {"name": "truncate"}}, "compressor", "text"),
    ],
)
async def test_bad_requests_are_400s_naming_the_problem(
    make_client: MakeClient, body: dict[str, Any], param: str | None, message: str
) -> None:
    limits = ServerConfig(max_score_items=4, max_score_item_chars=100, max_score_item_tokens=30)
    client = await make_client(limits)
    status, data = await score(client, **{"items": ["a", "b"], "label_token_ids": LABELS, **body})
    assert status == 400, data
    assert data["error"]["type"] == "invalid_request_error"
    assert message in data["error"]["message"]
    assert data["error"]["param"] == param


async def test_unknown_model_and_api_key(make_client: MakeClient) -> None:
    client = await make_client(ServerConfig(api_key="sekrit"))
    status, data = await score(client, label_token_ids=LABELS)
    assert status == 401 and data["error"]["code"] == "invalid_api_key"
    resp = await client.post(
        "/v1/score",
        json={"query": "q", "items": ["a"], "label_token_ids": LABELS, "model": "other"},
        headers={"Authorization": "Bearer sekrit"},
    )
    assert resp.status == 404


async def test_queue_full_is_429(make_client: MakeClient) -> None:
    client = await make_client(max_waiting_requests=3)
    status, data = await score(client, label_token_ids=LABELS)  # 4 items + warm-up > 3
    assert status == 429 and data["error"]["code"] == "queue_full"


def _reference(path: Path, prompts: list[list[int]]) -> list[list[float]]:
    model = load_hf(path)
    with torch.inference_mode():
        return [
            torch.softmax(model(torch.tensor([ids])).logits[0, -1].float()[LABELS], -1).tolist()
            for ids in prompts
        ]


async def test_scores_match_transformers(make_client: MakeClient, qwen3_dir: Path) -> None:
    client = await make_client(model=str(qwen3_dir), device="cpu", dtype="float32")
    status, data = await score(client, label_token_ids=LABELS)
    assert status == 200, data
    tok = client.app[ENGINE].tokenizer
    q = tok.encode(QUERY, add_special_tokens=False)
    prompts = [q + tok.encode(x, add_special_tokens=False) for x in ITEMS]
    for got, want in zip(data["scores"], _reference(qwen3_dir, prompts)):
        assert got == pytest.approx(want, abs=1e-4)
    assert data["usage"]["cached_tokens"] > 0
