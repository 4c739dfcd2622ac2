"""End to end: three ``slmserve serve`` replicas (demo model) behind ``slmserve route``.

Requests go through the router streaming and not; then one replica is killed (SIGKILL) while
requests are in flight, and every request is accounted for: non-streaming ones that were
cut off before any response byte are retried on a live replica and succeed, a stream the dead
replica had started ends with an error event, and requests sent after the kill all succeed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "SLMSERVE_DISABLE_PLUGIN_AUTOLOAD": "1"}


class Proc:
    def __init__(self, args: list[str], pattern: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slmserve", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=ENV,
        )
        self.url = ""
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.pattern = pattern
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(self.pattern, line)
            if m and not self.url:
                self.url = m.group(1)
                self.ready.set()
        self.ready.set()

    def wait_ready(self) -> str:
        if not self.ready.wait(120) or not self.url:
            self.proc.kill()
            raise AssertionError("did not start:\n" + "".join(self.lines))
        return self.url

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Proc, list[Proc]]]:
    serve = ["serve", "--port", "0", "--torch-threads", "1", "--kv-tokens", "4096"]
    replicas = [
        Proc([*serve, "--scheduler", "dlpm"], r"serving .* on (http://\S+) \(") for _ in range(3)
    ]
    router = None
    try:
        urls = [r.wait_ready() for r in replicas]
        args = ["route", "--port", "0", "--policy", "d2lpm", "--health-interval", "0.5"]
        for u in urls:
            args += ["--replica", u]
        router = Proc(args, r"routing on (http://\S+) \(")
        router.wait_ready()
        yield router, replicas
    finally:
        if router is not None:
            router.stop()
        for r in replicas:
            r.stop()


def body(prompt: str, client: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "demo",
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0.0,
        "ignore_eos": True,
        "user": client,
        **extra,
    }


async def complete(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> Any:
    async with session.post(f"{url}/v1/completions", json=payload) as resp:
        return resp.status, await resp.json()


async def stream(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> Any:
    """(status, chunks, error event or None, saw [DONE])."""
    chunks, error, done = [], None, False
    async with session.post(f"{url}/v1/completions", json={**payload, "stream": True}) as resp:
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            else:
                chunks.append(event)
        return resp.status, chunks, error, done


async def test_requests_through_the_router_and_a_replica_killed_mid_run(
    cluster: tuple[Proc, list[Proc]],
) -> None:
    router, replicas = cluster
    url = router.url
    async with aiohttp.ClientSession() as s:
        # -- the API through the router
        async with s.get(f"{url}/health") as resp:
            assert resp.status == 200 and (await resp.json())["replicas_live"] == 3
        async with s.get(f"{url}/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "demo"
        doc = "The quick brown fox jumps over the lazy dog. " * 6
        results = await asyncio.gather(
            *(complete(s, url, body(doc + f"question {i}?", f"client{i % 2}")) for i in range(6))
        )
        assert all(status == 200 and len(r["choices"][0]["text"]) > 0 for status, r in results)
        status, chunks, error, done = await stream(s, url, body(doc + "stream?", "client0"))
        assert status == 200 and error is None and done and len(chunks) >= 2
        async with s.get(f"{url}/metrics") as resp:
            text = await resp.text()
        assert 'slmserve_router:replica_up{replica="' in text
        assert 'slmserve_router:client_requests_total{client="client0"} 4.0' in text

        # -- kill one replica while requests are in flight
        batch = [
            complete(s, url, body(doc + f"late {i}", f"client{i % 3}", max_tokens=48))
            for i in range(9)
        ]
        streams = [
            stream(s, url, body(doc + f"late stream {i}", "client2", max_tokens=48))
            for i in range(3)
        ]
        tasks = [asyncio.ensure_future(c) for c in (*batch, *streams)]
        await asyncio.sleep(0.6)
        replicas[0].stop(signal.SIGKILL)
        done_results = await asyncio.gather(*tasks)

        for status, r in done_results[:9]:  # cut off before any byte: retried elsewhere
            assert status == 200, r
            assert r["usage"]["completion_tokens"] == 48
        for status, chunks, error, finished in done_results[9:]:
            assert status == 200
            if error is not None:  # the dead replica had started this stream
                assert error["code"] == "replica_failed" and not finished
            else:
                assert finished and chunks[-1]["choices"][0]["finish_reason"] == "length"

        # -- after the kill: everything succeeds on the two live replicas
        after = await asyncio.gather(
            *(complete(s, url, body(doc + f"after {i}", "client1")) for i in range(6))
        )
        assert all(status == 200 for status, _ in after)
        await asyncio.sleep(1.2)  # a health round
        async with s.get(f"{url}/metrics") as resp:
            text = await resp.text()
        dead = replicas[0].url
        assert f'slmserve_router:replica_up{{replica="{dead}"}} 0.0' in text
        # the kill did hit requests in flight (else this test proves nothing)
        cut = [e for *_, e, _ in done_results[9:] if e is not None]
        assert cut or f'attempts_total{{outcome="unreachable",replica="{dead}"}}' in text
        async with s.get(f"{url}/health") as resp:
            assert (await resp.json())["replicas_live"] == 2


async def test_router_answers_503_in_openai_format_without_replicas() -> None:
    router = Proc(
        ["route", "--port", "0", "--replica", "http://127.0.0.1:9", "--health-interval", "5"],
        r"routing on (http://\S+) \(",
    )
    try:
        url = router.wait_ready()
        async with aiohttp.ClientSession() as s:
            status, r = await complete(s, url, body("hello", "c"))
            assert status == 503 and r["error"]["code"] == "no_replica"
            async with s.post(f"{url}/v1/completions", data=b"{not json") as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["type"] == "invalid_request_error"
    finally:
        router.stop()


def test_route_command_rejects_bad_input() -> None:
    for args, message in (
        (["--replica", "localhost:8000"], "must be an http(s):// URL"),
        (["--replica", "http://a", "--policy-opt", "quantum=-1"], "quantum"),
        (["--replica", "http://a", "--health-timeout", "0"], "--health-timeout must be > 0"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "slmserve", "route", *args],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
