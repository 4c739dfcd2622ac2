"""Multi-replica routing: round_robin, least_load, cache_aware and d2lpm, measured two ways.

(a) Simulator: the ``zipf-clients`` skewed-client workload on 4 and 8 simulated replicas (the
    real engine core, radix cache and local schedulers on simulated time), at two loads.
    Per policy: worst per-client P99 latency, overall P99 latency and TTFT, load imbalance
    (max/mean replica work), cache hit rate; and the ratio cache_aware / d2lpm of the worst
    per-client P99 latency (target >= 2 at a hit rate >= round_robin's).
(b) Real replicas: three ``slmserve serve`` processes on the demo model (CPU, one torch thread
    each) behind ``slmserve route``, a small scaled-down version of the workload sent over
    HTTP at a fixed Poisson rate; the same metrics measured from the responses.

    python benchmarks/routing.py                 # (a) and (b), ~10 min on 2 cores
    python benchmarks/routing.py --parts a       # simulator only
    python benchmarks/routing.py --quick         # smoke run

Writes ``benchmarks/out/routing_{a,b}.md`` (tables) and ``routing_{a,b}.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from slmserve.plugins import PluginManager
from slmserve.sim import SimConfig, make_workload, measure_capacity
from slmserve.sim.cluster import ReplicaSpec, simulate_cluster, summarize_cluster

OUT = Path(__file__).parent / "out"

SKEWED = {
    "client_skew": 1.5,
    "prefixes_per_client": 2,
    "prefix_len": 4096,
    "suffix_len": [256, 1024],
    "output_len": [4, 16],
}
"""The skewed-client workload: client0 sends ~52% of requests, mostly about one 4k document."""

POLICIES: list[tuple[str, str, dict[str, Any], str]] = [
    ("round_robin", "round_robin", {}, "lpm"),
    ("least_load", "least_load", {}, "lpm"),
    ("cache_aware", "cache_aware", {}, "lpm"),
    (
        "cache_aware (0.3/64/1.5)",
        "cache_aware",
        {"cache_threshold": 0.3, "balance_abs_threshold": 64, "balance_rel_threshold": 1.5},
        "lpm",
    ),
    ("cache_aware + dlpm", "cache_aware", {}, "dlpm"),
    ("d2lpm", "d2lpm", {}, "dlpm"),
    ("d2lpm q=131072", "d2lpm", {"quantum": 131072}, "dlpm"),
]


# ---------------------------------------------------------------------------- (a) simulator


def part_a(quick: bool) -> tuple[list[dict[str, Any]], str]:
    pm = PluginManager(load_entrypoints=False)
    n_requests = 400 if quick else 2000
    sizes = [4] if quick else [4, 8]
    loads = [1.0] if quick else [0.7, 1.0]
    rows: list[dict[str, Any]] = []
    for n in sizes:
        w = make_workload("zipf-clients", seed=0, num_requests=n_requests * n // 4, **SKEWED)
        config = SimConfig(kv_tokens=w.kv_tokens)
        capacity = n * measure_capacity(w.requests, config)
        for load in loads:
            requests = w.scaled(load * capacity).requests
            for label, router, options, local in POLICIES:
                replicas = [
                    ReplicaSpec(f"r{i}", pm.schedulers.get(local)(), config) for i in range(n)
                ]
                t0 = time.perf_counter()
                res = simulate_cluster(requests, pm.routers.get(router)(**options), replicas)
                s = summarize_cluster(res)
                rows.append(
                    {
                        "replicas": n,
                        "load": load,
                        "policy": label,
                        "local": local,
                        "worst_p99": s.worst_client_p99_latency,
                        "worst_client": s.worst_client,
                        "p99": s.latency.p99,
                        "p99_ttft": s.ttft.p99,
                        "imbalance": s.load_imbalance,
                        "hit": s.cache_hit_rate,
                        "rps": s.throughput_rps,
                        "per_client_p99": {c: v.latency.p99 for c, v in s.clients.items()},
                    }
                )
                print(
                    f"(a) n={n} load={load} {label:<26} worst p99 {s.worst_client_p99_latency:.3f}"
                    f" hit {s.cache_hit_rate:.2f} imb {s.load_imbalance:.2f}"
                    f" ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    return rows, table_a(rows)


def table_a(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| replicas | load | policy | local | worst client P99 latency (s) | P99 latency | "
        "P99 TTFT | load imbalance | hit rate |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['replicas']} | {r['load']:g} | `{r['policy']}` | {r['local']} | "
            f"{r['worst_p99']:.3f} ({r['worst_client']}) | {r['p99']:.3f} | {r['p99_ttft']:.3f} | "
            f"{r['imbalance']:.2f} | {r['hit']:.3f} |"
        )
    lines.append("")
    for key in sorted({(r["replicas"], r["load"]) for r in rows}):
        by = {r["policy"]: r for r in rows if (r["replicas"], r["load"]) == key}
        ca, d2, rr = by["cache_aware"], by["d2lpm"], by["round_robin"]
        lines.append(
            f"* {key[0]} replicas, load {key[1]:g}: cache_aware / d2lpm worst-client P99 = "
            f"{ca['worst_p99'] / d2['worst_p99']:.2f}x; d2lpm hit rate {d2['hit']:.3f} vs "
            f"round_robin {rr['hit']:.3f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- (b) real replicas


class Proc:
    """A child ``slmserve`` process whose address is read from its log."""

    def __init__(self, args: list[str], pattern: str) -> None:
        env = {**os.environ, "SLMSERVE_DISABLE_PLUGIN_AUTOLOAD": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slmserve", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.url = ""
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(pattern, line)
                if m and not self.url:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(180) or not self.url:
            self.proc.kill()
            raise RuntimeError("process did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_replica(scheduler: str, kv_tokens: int) -> Proc:
    return Proc(
        ["serve", "--port", "0", "--torch-threads", "1", "--kv-tokens", str(kv_tokens),
         "--scheduler", scheduler],
        r"serving .* on (http://\S+) \(",
    )  # fmt: skip


def start_router(urls: list[str], policy: str, options: dict[str, Any]) -> Proc:
    args = ["route", "--port", "0", "--policy", policy, "--health-interval", "1"]
    for u in urls:
        args += ["--replica", u]
    for k, v in options.items():
        args += ["--policy-opt", f"{k}={v}"]
    return Proc(args, r"routing on (http://\S+) \(")


def http_workload(n: int, seed: int) -> list[tuple[float, str, str, int]]:
    """``(offset s, client, prompt, max_tokens)``: zipf-clients in text, scaled for CPU."""
    w = make_workload(
        "zipf-clients",
        seed=seed,
        num_requests=n,
        clients=6,
        client_skew=1.5,
        prefixes_per_client=2,
        prefix_len=[200, 300],
        suffix_len=[20, 60],
        output_len=[2, 6],
        rate=1.0,
    )
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    out = []
    for r in w.requests:
        text = "".join(alphabet[r.prompt % len(alphabet)])
        out.append((r.arrival, r.client, text, r.output_len))
    return out


async def drive(url: str, work: list[tuple[float, str, str, int]], rate: float) -> dict[str, Any]:
    import aiohttp

    results: list[tuple[str, float, int, int, int]] = []

    async def one(session: aiohttp.ClientSession, at: float, client: str, prompt: str, k: int):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        start = time.perf_counter()
        body = {"model": "demo", "prompt": prompt, "max_tokens": k, "user": client,
                "temperature": 0.0, "ignore_eos": True}  # fmt: skip
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            data = await resp.json()
        usage = data.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        results.append(
            (
                client,
                time.perf_counter() - start,
                resp.status,
                usage.get("prompt_tokens", 0),
                cached,
            )
        )

    offsets = [a for a, *_ in work]
    scale = (len(work) - 1) / (offsets[-1] - offsets[0]) / rate
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(one(session, (a - offsets[0]) * scale, c, p, k) for a, c, p, k in work)
        )
    ok = [r for r in results if r[2] == 200]
    per_client: dict[str, float] = {}
    for c in sorted({r[0] for r in ok}):
        per_client[c] = float(np.percentile([r[1] for r in ok if r[0] == c], 99))
    prompt = sum(r[3] for r in ok)
    return {
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "worst_p99": max(per_client.values()),
        "worst_client": max(per_client, key=per_client.__getitem__),
        "p99": float(np.percentile([r[1] for r in ok], 99)),
        "hit": sum(r[4] for r in ok) / prompt if prompt else 0.0,
        "per_client_p99": per_client,
    }


def part_b(quick: bool) -> tuple[list[dict[str, Any]], str]:
    n = 60 if quick else 240
    rate = 6.0
    work = http_workload(n, seed=1)
    rows = []
    for label, router, options, local in POLICIES:
        if label in ("cache_aware (0.3/64/1.5)", "cache_aware + dlpm", "d2lpm q=131072"):
            continue
        replicas = [start_replica(local, 2048) for _ in range(3)]
        try:
            proxy = start_router([r.url for r in replicas], router, {**options, **(
                {"cache_tokens": 2048} if router == "d2lpm" else {})})  # fmt: skip
            try:
                t0 = time.perf_counter()
                res = asyncio.run(drive(proxy.url, work, rate))
            finally:
                proxy.stop()
        finally:
            for r in replicas:
                r.stop()
        res.update(policy=label, local=local)
        rows.append(res)
        print(
            f"(b) {label:<14} worst p99 {res['worst_p99']:.3f} hit {res['hit']:.3f} "
            f"ok {res['ok']} failed {res['failed']} ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    lines = [
        f"3 replicas (demo model, CPU, 1 torch thread each, KV 2,048 tokens), {n} requests at "
        f"{rate:g} req/s:",
        "",
        "| policy | local | worst client P99 latency (s) | P99 latency | hit rate | ok / failed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['policy']}` | {r['local']} | {r['worst_p99']:.3f} ({r['worst_client']}) | "
            f"{r['p99']:.3f} | {r['hit']:.3f} | {r['ok']} / {r['failed']} |"
        )
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    for part, title, run in (("a", "Simulator", part_a), ("b", "Three real replicas", part_b)):
        if part not in args.parts:
            continue
        rows, table = run(args.quick)
        text = f"## ({part}) {title}\n\n{table}\n"
        (OUT / f"routing_{part}.md").write_text(text)
        (OUT / f"routing_{part}.json").write_text(json.dumps(rows, indent=1))
        print(text)


if __name__ == "__main__":
    main()
