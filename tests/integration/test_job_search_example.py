"""``examples/job_search``: the catalog generator is seeded and well formed, and a small run of
the scoring script against a live server fills every row of its table."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

from slmserve import Engine, EngineConfig
from slmserve.server import create_app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "job_search"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"job_search_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(EXAMPLE))  # run.py imports its sibling
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE))
    return module


@contextmanager
def live_server(app: web.Application) -> Iterator[str]:
    """The app on a real port, its event loop in a thread (the script's HTTP calls block)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=60)
        loop.close()


def test_catalog_is_seeded_and_has_the_fields(tmp_path: Path) -> None:
    catalog = load("catalog")
    out = tmp_path / "catalog.jsonl"
    assert catalog.main(["--items", "20", "--seed", "3", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert rows == catalog.make_catalog(20, seed=3)
    assert rows != catalog.make_catalog(20, seed=4)
    for r in rows:
        assert r["title"] in r["text"] and r["location"] in r["text"]
        assert all(skill in r["text"] for skill in r["skills"])
        assert r["text"].count(". ") >= 6  # a long, multi-sentence description


@pytest.mark.slow
def test_scoring_run_fills_every_row(demo_backend: Any, tmp_path: Path) -> None:
    run = load("run")
    engine = Engine(EngineConfig(kv_tokens=16384, gc_freeze=False), backend=demo_backend)
    with live_server(create_app(engine)) as url:
        args = run.parse_args(["--url", url, "--items", "3", "--queries", "1", "--budget", "24"])
        rows = {row.name: row for row in run.run(url, args, str(tmp_path / "s.sqlite"))}
    assert list(rows) == [
        "none",
        "truncate",
        "extractive",
        "summary (first sight)",
        "summary (cached)",
    ]
    assert all(row.items == 3 and row.seconds > 0 for row in rows.values())
    assert rows["none"].ratios == 1.0
    for name in ("truncate", "extractive", "summary (cached)"):
        assert rows[name].ratios > 5  # postings are ~1000 tokens, the budget is 24
        assert rows[name].prompt_tokens < rows["none"].prompt_tokens / 5
    assert rows["summary (cached)"].prompt_tokens == rows["summary (first sight)"].prompt_tokens
    assert all(row.cached_tokens > 0 for row in rows.values())  # the query prefix is shared
