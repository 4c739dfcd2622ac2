"""HTTP overhead: the same requests over the OpenAI API and submitted to the engine directly.

Workload: ``--requests`` short prompts (about 25 tokens, new ones for every run so nothing is
served from the prefix cache), ``max_tokens=1``, ``--concurrency`` in flight at a time (64 by
default), on the demo model. Each request is timed from submission to its complete result:
``engine.submit`` + draining the stream (direct) or ``POST /v1/completions`` + reading the
JSON body (HTTP). Phases alternate (direct, HTTP, direct, HTTP, ...) after a warm-up, so drift
in machine load hits both. Prints requests/s, p50 and p99 latency of each, CPU per request,
and HTTP/direct throughput (target: at least 0.80), overall and per round.

``--server subprocess`` (default) runs ``slmserve serve`` in a child process, as deployed:
HTTP in its front process, the engine in a process of its own (``--no-engine-process``: both
in one process). The direct phase submits to an engine in this process. ``--server
inprocess`` serves the app from this process, on the same engine the direct phase uses (one
process, one interpreter lock for client, HTTP and engine).

The HTTP load generator is, by default, a minimal keep-alive HTTP/1.1 client (``--client
raw``, ~30 us of CPU per request, like ``wrk``); aiohttp's client (``--client aiohttp``)
costs ~130 us, which on a 2-core host comes out of the server's share. ``--engine-cpus auto``
(default, with an engine process) starts the server with ``--engine-cpus`` set to the last
CPU and keeps this process off it while it drives HTTP; the direct phase may use every CPU.

    python benchmarks/http_api.py --torch-threads 1
    python benchmarks/http_api.py --torch-threads 1 --no-engine-process
    python benchmarks/http_api.py --torch-threads 1 --engine-cpus none --client aiohttp
    python benchmarks/http_api.py --server inprocess
    python benchmarks/http_api.py --backend null       # no model: the framework's own ceiling

On a host with few cores, torch's default of one intra-op thread per core competes with the
event loop (and, in-process, the client) and its OpenMP threads spin while they wait: the demo
model then runs several times slower and erratically. ``--torch-threads 1`` avoids that on a
2-core machine; the line above the summary prints what was used.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory leads sys.path and this file would shadow the
# standard library's ``http`` package (which aiohttp imports). Drop that entry first.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse
import asyncio
import itertools
import re
import statistics
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial

import aiohttp
import msgspec
from aiohttp import web

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect
from slmserve.server import ServerConfig, create_app


@dataclass
class Run:
    name: str
    seconds: float
    latencies: list[float]
    cpu: float | None = None
    """CPU seconds used by the serving process (all its threads) during the run."""
    steps: int | None = None
    """Engine steps taken during the run (when the engine is in this process)."""
    client_cpu: float | None = None
    """CPU seconds used by this process when the server is another one (the client's)."""

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def line(self) -> str:
        n = len(self.latencies)
        cpu = f"  cpu/req {self.cpu / n * 1e6:>5.0f} us" if self.cpu is not None else ""
        batch = f"  req/step {n / self.steps:>5.1f}" if self.steps else ""
        client = f"  client cpu/req {self.client_cpu / n * 1e6:>4.0f} us" if self.client_cpu else ""
        return (
            f"{self.name:<8} {n:>6} req  {self.rps:>8.1f} req/s  "
            f"p50 {self.pct(0.50):>7.1f} ms  p99 {self.pct(0.99):>7.1f} ms{cpu}{batch}{client}"
        )


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def process_cpu(pid: int) -> float:
    """CPU seconds of another process and its descendants (Linux ``/proc``; 0 elsewhere):
    the server's front and, when it has one, its engine process."""
    if not os.path.exists(f"/proc/{pid}/stat"):
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used + sum(process_cpu(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


async def drive(
    name: str,
    one: Callable[[str], Awaitable[None]],
    prompts: list[str],
    concurrency: int,
    cpu: Callable[[], float],
    steps: Callable[[], Awaitable[int]],
) -> Run:
    """Run ``one(prompt)`` for every prompt with ``concurrency`` workers; time each call."""
    latencies: list[float] = []
    queue = iter(prompts)

    async def worker() -> None:
        for prompt in queue:
            t0 = time.perf_counter()
            await one(prompt)
            latencies.append(time.perf_counter() - t0)

    steps0 = await steps()
    cpu0, own0 = cpu(), own_cpu()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    used, own = cpu() - cpu0, own_cpu() - own0
    client = own if cpu is not own_cpu else None
    return Run(name, seconds, latencies, used, await steps() - steps0, client)


def engine_steps(engine: Engine) -> Callable[[], Awaitable[int]]:
    async def read() -> int:
        return engine.times.steps

    return read


def scraped_steps(session: aiohttp.ClientSession, url: str) -> Callable[[], Awaitable[int]]:
    """Engine steps of a server, from its ``/metrics``."""

    async def read() -> int:
        async with session.get(f"{url}/metrics") as resp:
            text = await resp.text()
        match = re.search(r"^slmserve:engine_steps_total\{[^}]*\} (\S+)$", text, re.M)
        return int(float(match.group(1))) if match else 0

    return read


def direct_caller(engine: Engine) -> Callable[[str], Awaitable[None]]:
    """Tokenize as the server does (the Rust tokenizer, inline), then ``engine.submit``: the
    two paths differ by the HTTP layer only."""
    params = SamplingParams(max_tokens=1)
    encode = engine.tokenizer.backend_tokenizer.encode

    async def one(prompt: str) -> None:
        ids = encode(prompt, add_special_tokens=True).ids
        result = await collect(engine.submit(ids, params))
        assert result.finish_reason in ("length", "stop"), result

    return one


def http_caller(session: aiohttp.ClientSession, url: str) -> Callable[[str], Awaitable[None]]:
    async def one(prompt: str) -> None:
        body = {"model": "demo", "prompt": prompt, "max_tokens": 1}
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            data = await resp.json()
            assert resp.status == 200, data

    return one


class RawClient:
    """A minimal HTTP/1.1 keep-alive load generator (one connection per worker), like ``wrk``.

    On a 2-core host the load generator takes CPU from the server it measures; aiohttp's client
    spends ~130 us per request, this one a fraction of that. It sends the same JSON request and
    reads the whole response (``Content-Length``) and checks its status and body."""

    def __init__(self, url: str, connections: int) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.connections = connections
        self.pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def __aenter__(self) -> RawClient:
        for _ in range(self.connections):
            self.pool.put_nowait(await asyncio.open_connection(self.host, self.port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        while not self.pool.empty():
            _, writer = self.pool.get_nowait()
            writer.close()

    def caller(self) -> Callable[[str], Awaitable[None]]:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n"
        )

        async def one(prompt: str) -> None:
            body = msgspec.json.encode({"model": "demo", "prompt": prompt, "max_tokens": 1})
            reader, writer = await self.pool.get()
            try:
                writer.write(head.format(len(body)).encode() + body)
                header = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", header).group(1))  # type: ignore[union-attr]
                data = await reader.readexactly(length)
            finally:
                self.pool.put_nowait((reader, writer))
            assert header.startswith(b"HTTP/1.1 200"), (header, data)
            assert msgspec.json.decode(data)["choices"][0]["finish_reason"], data

        return one


@contextmanager
def subprocess_server(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """``slmserve serve --port 0`` in a child process; yields its base URL and pid."""
    cmd = [sys.executable, "-m", "slmserve", "serve", "--port", "0", "--backend", args.backend]
    cmd += ["--kv-tokens", str(args.kv_tokens), "--device", args.device]
    if not args.engine_process:
        cmd.append("--no-engine-process")
    elif args.engine_cpus:
        cmd += ["--engine-cpus", args.engine_cpus]
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            match = re.search(r"serving .* on (http://\S+) \(", line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(180) or not found:
            raise RuntimeError("the server did not start")
        yield found[0], proc.pid
    finally:
        proc.terminate()
        proc.wait(60)
        reader.join(10)
        if proc.stderr is not None:
            proc.stderr.close()


@asynccontextmanager
async def inprocess_server(engine: Engine) -> AsyncIterator[str]:
    """The app on ``engine``, served from this event loop; yields its base URL."""
    runner = web.AppRunner(create_app(engine, ServerConfig(port=0)), access_log=None)
    await runner.setup()  # starts the engine
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()  # stops the engine


def client_cpus(args: argparse.Namespace) -> set[int] | None:
    """Resolve ``--engine-cpus``; the CPUs this process keeps while it drives HTTP (the
    others belong to the server's engine process), or ``None`` when nothing is pinned."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = args.server == "subprocess" and args.engine_process and len(usable) >= 2
    if args.engine_cpus == "none" or not pinned:
        args.engine_cpus = None
        return None
    if args.engine_cpus == "auto":
        args.engine_cpus = str(usable[-1])
    from slmserve.server.config import parse_cpus

    return set(usable) - parse_cpus(args.engine_cpus)


def set_affinity(cpus: set[int] | None) -> None:
    """Every thread of this process (the direct engine's model thread too) onto ``cpus``."""
    if cpus is None:
        return
    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), cpus)


async def main(args: argparse.Namespace) -> None:
    all_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    http_cpus = client_cpus(args)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    runs_made = itertools.count()

    def fresh(n: int) -> list[str]:
        """Prompts no earlier run has sent: every run prefills cold, none rides the cache."""
        r = next(runs_made)
        return [f"Run {r} request {i}: hi" for i in range(n)]

    config = EngineConfig(
        backend=args.backend,
        device=args.device,
        kv_tokens=args.kv_tokens,
        max_waiting_requests=max(4096, args.concurrency * 4),
    )
    engine = Engine(config)
    runs: dict[str, list[Run]] = {"direct": [], "http": []}
    with ExitStack() as stack:
        async with inprocess_server(engine) as local_url:
            url, http_cpu = local_url, own_cpu
            if args.server == "subprocess":
                url, pid = stack.enter_context(subprocess_server(args))
                http_cpu = partial(process_cpu, pid)
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                RawClient(url, args.concurrency) as raw,
            ):
                http = http_caller(session, url) if args.client == "aiohttp" else raw.caller()
                # The direct engine may use every CPU; the HTTP client stays off the
                # engine process's ones.
                phases = [
                    ("direct", direct_caller(engine), own_cpu, engine_steps(engine), all_cpus),
                    ("http", http, http_cpu, scraped_steps(session, url), http_cpus),
                ]
                for _, call, cpu, steps, cpus in phases:
                    set_affinity(cpus)
                    limits = (args.concurrency, cpu, steps)
                    await drive("warm-up", call, fresh(4 * args.concurrency), *limits)
                for _ in range(args.rounds):
                    for name, call, cpu, steps, cpus in phases:
                        set_affinity(cpus)
                        limits = (args.concurrency, cpu, steps)
                        run = await drive(name, call, fresh(args.requests), *limits)
                        runs[name].append(run)
                        print(run.line(), flush=True)
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[str, list[Run]]) -> None:
    def total(rs: list[Run]) -> Run:
        steps = [r.steps for r in rs]
        return Run(
            rs[0].name,
            sum(r.seconds for r in rs),
            [x for r in rs for x in r.latencies],
            sum(r.cpu or 0.0 for r in rs),
            None if None in steps else sum(s or 0 for s in steps),
            sum(r.client_cpu or 0.0 for r in rs) or None,
        )

    direct, http = total(runs["direct"]), total(runs["http"])
    print("-" * 100)
    print(
        f"backend={args.backend} server={args.server}"
        f"{' engine-process' if args.server == 'subprocess' and args.engine_process else ''} "
        f"client={args.client} engine_cpus={args.engine_cpus} concurrency={args.concurrency} "
        f"max_tokens=1 cpus={os.cpu_count()} torch_threads={_torch_threads()}"
    )
    print(direct.line())
    print(http.line())
    print(f"HTTP / direct throughput: {http.rps / direct.rps:.2f}  (target >= 0.80)")
    rounds = [h.rps / d.rps for d, h in zip(runs["direct"], runs["http"])]
    print(
        f"per round (each HTTP run over the direct run just before it): "
        f"{' '.join(f'{r:.2f}' for r in rounds)}; median {statistics.median(rounds):.2f}"
    )
    if direct.cpu and http.cpu:
        whose = "server processes" if args.server == "subprocess" else "this process, with client"
        print(
            f"HTTP / direct CPU per request: {http.cpu / direct.cpu:.2f} ({whose}); "
            f"the throughput ratio when CPU-bound: {direct.cpu / http.cpu:.2f}"
        )
    added = statistics.median(http.latencies) - statistics.median(direct.latencies)
    print(f"median latency added by HTTP: {added * 1000:.2f} ms")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--server", choices=["subprocess", "inprocess"], default="subprocess")
    p.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="subprocess server: engine in its own process (the default of slmserve serve)",
    )
    p.add_argument("--backend", default="native", help="native (demo model) or null")
    p.add_argument(
        "--engine-cpus",
        default="auto",
        help="subprocess server with an engine process: its --engine-cpus; 'auto': the last "
        "usable CPU (this process, client and direct engine, then takes the others, like the "
        "server's front); 'none': no pinning",
    )
    p.add_argument(
        "--client",
        choices=["raw", "aiohttp"],
        default="raw",
        help="HTTP load generator: a minimal keep-alive HTTP/1.1 client, or aiohttp's",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-tokens", type=int, default=16384)
    p.add_argument(
        "--torch-threads",
        type=int,
        help="intra-op threads for the model (here and in the server); default: torch's",
    )
    return p.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(arguments))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
            loop_runner.run(main(arguments))
