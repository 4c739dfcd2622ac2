"""Lifecycle hooks: startup and shutdown (sync or async impls) and request_finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slmserve import Engine, EngineConfig, SamplingParams, hookimpl
from slmserve.engine import collect
from slmserve.plugins import PluginManager


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @hookimpl
    async def slmserve_startup(self, engine: Any) -> None:
        self.events.append(("startup", engine.running))

    @hookimpl
    def slmserve_shutdown(self, engine: Any) -> None:
        self.events.append(("shutdown", engine.running))

    @hookimpl
    def slmserve_request_finished(self, engine: Any, request_id: str, info: dict) -> None:
        self.events.append(("finished", (request_id, info)))


async def test_lifecycle_hooks_fire_in_order(qwen3_dir: Path) -> None:
    recorder = Recorder()
    plugins = PluginManager(load_entrypoints=False, extra_plugins=(recorder,))
    config = EngineConfig(model=str(qwen3_dir), device="cpu", kv_tokens=1024)
    async with Engine(config, plugins=plugins) as engine:
        done = await collect(engine.submit("hi", SamplingParams(max_tokens=3, ignore_eos=True)))
        stream = engine.submit("bye", SamplingParams(max_tokens=500, ignore_eos=True))
        engine.abort(stream.request_id)
        await collect(stream)
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["startup", "finished", "finished", "shutdown"]
    assert recorder.events[0][1] is True  # the engine was running when startup fired
    (rid1, info1), (rid2, info2) = recorder.events[1][1], recorder.events[2][1]
    assert rid1 == done.request_id and info1["finish_reason"] == "length"
    assert info1["output_tokens"] == 3 and info1["prompt_tokens"] == len("hi")
    assert info1["arrival_time"] <= info1["first_token_time"] <= info1["finish_time"]
    assert rid2 == stream.request_id and info2["finish_reason"] == "abort"


class Faulty:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def slmserve_request_finished(self, engine: Any, request_id: str, info: dict) -> None:
        self.calls += 1
        raise RuntimeError("observer bug")


async def test_a_request_finished_hook_that_raises_is_logged_not_fatal(
    qwen3_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hook runs inside the step loop: its failure is logged, and the request, its
    neighbours and the engine carry on."""
    faulty = Faulty()
    plugins = PluginManager(load_entrypoints=False, extra_plugins=(faulty,))
    config = EngineConfig(model=str(qwen3_dir), device="cpu", kv_tokens=1024)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    async with Engine(config, plugins=plugins) as engine:
        first, second = [await collect(engine.submit(p, params)) for p in ("one", "two")]
        assert engine.running
    assert [r.finish_reason for r in (first, second)] == ["length", "length"]
    assert faulty.calls == 2 and "slmserve_request_finished hook failed" in caplog.text
