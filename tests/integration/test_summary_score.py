"""``POST /v1/score`` with the ``summary`` compressor: summaries run off the event loop (even for
a couple of items), the scores are those of the summaries, and usage reports the ratio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slmserve import Engine, EngineConfig
from slmserve.compressors import count_tokens
from slmserve.compressors.summary import Summary
from slmserve.server import create_app
from slmserve.server.keys import ENGINE

LABELS = [89, 78]  # "Y", "N" in the byte tokenizer
QUERY = "Query: senior python engineer, remote. "
ITEMS = [
    "Job: python developer in Berlin, building data pipelines with Spark. " * 3,
    "Job: chef in a busy kitchen, evenings and weekends, Lyon. " * 3,
]


@pytest.mark.parametrize("n_items", [2, 9])  # the inline path (< 8 items) and the thread path
async def test_summary_scores_and_reports_the_ratio(
    aiohttp_client: Any, demo_backend: Any, qwen3_dir: Path, tmp_path: Path, n_items: int
) -> None:
    engine = Engine(EngineConfig(kv_tokens=4096, gc_freeze=False), backend=demo_backend)
    client = await aiohttp_client(create_app(engine))
    items = [f"{i}. {ITEMS[i % 2]}" for i in range(n_items)]
    options = {"max_tokens": 12, "model": str(qwen3_dir), "cache": str(tmp_path / "s.sqlite")}
    body = {
        "query": QUERY,
        "items": items,
        "label_token_ids": LABELS,
        "compressor": {"name": "summary", "options": {**options, "device": "cpu"}},
    }
    resp = await client.post("/v1/score", json=body)
    data = await resp.json()
    assert resp.status == 200, data

    # The same summaries, now from the cache, scored directly by the engine.
    tok = client.app[ENGINE].tokenizer
    comp = Summary(**options, device="cpu")
    texts = comp.compress_many(items, query=QUERY, tokenizer=tok)
    assert comp.stats.hits == n_items and comp.stats.generated == 0
    want = await client.app[ENGINE].score(QUERY, texts, label_token_ids=LABELS)
    for got, row in zip(data["scores"], want.scores):
        assert got == pytest.approx(row, abs=1e-4)
    before = sum(count_tokens(tok, x) for x in items)
    after = sum(count_tokens(tok, x) for x in texts)
    assert data["usage"]["compression_ratio"] == pytest.approx(before / after)
    assert data["usage"]["compression_ratio"] > 5


async def test_bad_summary_options_are_400s_naming_the_option(
    aiohttp_client: Any, demo_backend: Any, tmp_path: Path
) -> None:
    engine = Engine(EngineConfig(kv_tokens=2048, gc_freeze=False), backend=demo_backend)
    client = await aiohttp_client(create_app(engine))
    for options, needle in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": "no placeholder"}, "prompt"),
        ({"model": str(tmp_path / "nope")}, "model"),
    ]:
        body = {
            "query": QUERY,
            "items": ITEMS,
            "label_token_ids": LABELS,
            "compressor": {"name": "summary", "options": {"cache": str(tmp_path / "c"), **options}},
        }
        resp = await client.post("/v1/score", json=body)
        data = await resp.json()
        assert resp.status == 400, data
        assert needle in data["error"]["message"] and data["error"]["param"] == "compressor"
