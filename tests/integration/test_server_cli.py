"""``slmserve serve`` as a user runs it: a subprocess, driven by the official ``openai`` client.

Slow (each server process imports torch and loads the demo model), but it is the one test of
the whole path: argument parsing, config layering, uvloop, the start-up log line, real sockets,
and SIGTERM draining to exit status 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}  # a vLLM-style extension, sent through extra_body


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for exit, then release the log pipe (read to its end by the reader)."""
        rc = self.proc.wait(timeout)
        if self.reader is not None:
            self.reader.join(timeout)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return rc

    def stop(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)


def start_server(*args: str, env: dict[str, str] | None = None) -> Server:
    """Start ``slmserve serve --port 0`` and wait for the log line that gives its address."""
    cmd = [sys.executable, "-m", "slmserve", "serve", "--port", "0", "--kv-tokens", "8192", *args]
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "SLMSERVE_DISABLE_PLUGIN_AUTOLOAD": "1", **(env or {})},
    )
    server = Server(proc)
    ready = threading.Event()

    def read() -> None:  # keep draining stderr so the pipe never fills
        assert proc.stderr is not None
        for line in proc.stderr:
            server.lines.append(line)
            match = re.search(r"serving .* on (http://\S+) \(", line)
            if match:
                server.url = match.group(1)
                ready.set()
        ready.set()

    server.reader = threading.Thread(target=read, daemon=True)
    server.reader.start()
    if not ready.wait(120) or not server.url:
        proc.kill()
        server.wait()
        raise AssertionError("server did not start:\n" + "".join(server.lines))
    return server


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = start_server(env={"SLMSERVE_API_KEY": API_KEY})
    try:
        yield srv
    finally:
        assert srv.stop() == 0, "".join(srv.lines)


def test_start_up_line(server: Server) -> None:
    (line,) = [x for x in server.lines if "serving" in x]
    for fragment in ("'demo'", "device=cpu", "kv_tokens=8192", "loop=uvloop", "RANDOM"):
        assert fragment in line


def test_completions(server: Server) -> None:
    with server.client() as client:
        _completions(client)


def _completions(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="demo", prompt="Hello", max_tokens=5, logprobs=2, extra_body=NO_EOS, **GREEDY
    )
    (choice,) = out.choices
    assert choice.finish_reason == "length" and out.usage is not None
    assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens == 5
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 5
    scored = client.completions.create(
        model="demo", prompt="Hello", max_tokens=0, echo=True, logprobs=0
    )
    lps = scored.choices[0].logprobs
    assert lps is not None and lps.token_logprobs is not None
    assert lps.token_logprobs[0] is None and all(x <= 0 for x in lps.token_logprobs[1:])
    assert scored.choices[0].text == "Hello"


def test_chat(server: Server) -> None:
    with server.client() as client:
        out = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Hi there"}],
            max_tokens=4,
            logprobs=True,
            top_logprobs=3,
            extra_body=NO_EOS,
            **GREEDY,
        )
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == 4
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)


def test_streaming(server: Server) -> None:
    with server.client() as client:
        _streaming(client)


def _streaming(client: openai.OpenAI) -> None:
    kwargs = {"model": "demo", "max_tokens": 8, "extra_body": NO_EOS, **GREEDY}
    whole = client.completions.create(prompt="Stream", **kwargs)  # type: ignore[call-overload]
    pieces, usage = [], None
    for chunk in client.completions.create(
        prompt="Stream", stream=True, stream_options={"include_usage": True}, **kwargs
    ):
        pieces += [c.text for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == whole.choices[0].text
    assert usage is not None and usage.completion_tokens == 8

    messages = [{"role": "user", "content": "Stream a chat"}]
    chat_whole = client.chat.completions.create(messages=messages, **kwargs)  # type: ignore[call-overload]
    deltas, roles = [], []
    for chunk in client.chat.completions.create(messages=messages, stream=True, **kwargs):
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            deltas.append(c.delta.content or "")
    assert roles == ["assistant"]
    assert "".join(deltas) == chat_whole.choices[0].message.content


def test_models_and_errors(server: Server) -> None:
    with server.client(api_key="wrong") as stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with server.client() as client:
        _models_and_errors(client)


def _models_and_errors(client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert model.id == "demo" and model.model_extra and model.model_extra["random_weights"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="demo", prompt="x", temperature=-3)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="demo", prompt="x", max_tokens=100_000)


def test_sigterm_drains_in_flight_requests() -> None:
    """SIGTERM with requests running: short ones finish, long ones are aborted at the
    timeout, every client gets a complete response, and the process exits 0."""
    # One torch thread keeps step times steady on a loaded 2-core CI machine.
    server = start_server("--shutdown-timeout", "5", "--torch-threads", "1")
    with server.client(api_key="unused") as client:
        _drain(server, client)


def _drain(server: Server, client: openai.OpenAI) -> None:
    long_kwargs = {"model": "demo", "max_tokens": 4000, "extra_body": NO_EOS}

    def short() -> str | None:
        out = client.completions.create(
            model="demo", prompt="short", max_tokens=5, extra_body=NO_EOS
        )
        return out.choices[0].finish_reason

    def long() -> str | None:
        return client.completions.create(prompt="long", **long_kwargs).choices[0].finish_reason  # type: ignore[call-overload]

    def long_stream() -> tuple[str | None, int]:
        reason, chunks = None, 0
        for chunk in client.completions.create(prompt="long", stream=True, **long_kwargs):  # type: ignore[call-overload]
            chunks += 1
            reason = chunk.choices[0].finish_reason or reason
        return reason, chunks

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(long), pool.submit(long_stream)]
        time.sleep(1.0)  # both are generating now
        futures.append(pool.submit(short))
        time.sleep(0.3)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=60) for f in futures]
        rc = server.wait(60)
    assert rc == 0, "".join(server.lines)
    assert results[0] == "abort"
    assert results[1][0] == "abort" and results[1][1] > 1
    assert results[2] == "length"
    assert time.monotonic() - started < 30
    assert any("stopped" in line for line in server.lines)


@pytest.mark.parametrize("mode", ["--engine-process", "--no-engine-process"])
def test_a_model_that_cannot_load_is_a_one_line_error(tmp_path: Path, mode: str) -> None:
    missing = tmp_path / "no-such-model"
    cmd = [sys.executable, "-m", "slmserve", "serve", "--port", "0", "--model", str(missing), mode]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "slmserve serve: error: the engine failed to start: " in done.stderr
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
