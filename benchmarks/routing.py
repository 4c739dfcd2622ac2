"""Multi-replica routing: round_robin, least_load, cache_aware and d2lpm, measured two ways.

(a) Simulator, 4 and 8 simulated replicas (the real engine core, radix cache and local
    schedulers on simulated time), two workloads:

    * ``steady``: the ``zipf-clients`` skewed-client workload at loads 0.7 and 1.0 (queues
      stay short; kept as first measured);
    * ``flood``: the regime D2LPM is about (locality-aware *fairness*): seven light clients,
      each within its fair share, at 0.4 of the cluster's capacity for their requests, while
      the heavy client floods it, as a burst (1.5x its capacity for its requests, the middle
      half of the run) or sustained (1.2x, the whole run). The headline metric is the worst
      P99 latency among the clients within their fair share; the heavy client's P99 is
      reported beside it (it is over capacity, so its queue grows under every policy).

    Per policy: worst per-client P99 latency, overall P99 latency and TTFT, load imbalance
    (max/mean replica work), cache hit rate; and the ratio cache_aware / d2lpm of the worst
    per-client P99 latency (target >= 2 at a hit rate >= round_robin's).
(b) Real replicas: three ``slmserve serve`` processes on the demo model (CPU, one torch thread
    each) behind ``slmserve route``, a scaled-down version of a workload sent over HTTP on a
    fixed Poisson schedule; the same metrics measured from the responses. By default the
    flood (its heavy rate a multiple of the replicas' capacity, measured first); ``steady``
    on request.

    python benchmarks/routing.py                 # (a) ~12 min and (b) ~6 min on 2 shared cores
    python benchmarks/routing.py --parts a       # simulator only
    python benchmarks/routing.py --quick         # smoke run
    python benchmarks/routing.py --parts b --b-workloads steady,flood   # (b) both workloads

Writes ``routing_{a,b}.md`` (tables) and ``routing_{a,b}.json`` to ``--out``
(default ``benchmarks/out``).
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
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from slmserve.plugins import PluginManager
from slmserve.sim import SimConfig, make_workload, measure_capacity
from slmserve.sim.cluster import (
    ClusterSummary,
    ReplicaSpec,
    simulate_cluster,
    summarize_cluster,
)
from slmserve.sim.simulator import SimRequest

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
    ("d2lpm + lpm", "d2lpm", {}, "lpm"),
]
"""(label, router, options, local scheduler). ``cache_aware + dlpm`` and ``d2lpm + lpm`` split
a difference between the router and the replicas' local scheduler."""

FLOOD_COMMON = {
    "prefixes_per_client": 2,
    "prefix_len": 4096,
    "suffix_len": [256, 1024],
    "output_len": [4, 16],
}
LIGHT_CLIENTS = 7
LIGHT_SKEW = 0.5
LIGHT_LOAD = 0.4
"""The light clients' offered load, as a fraction of the cluster's capacity for their
requests; the busiest of them then sends ~0.1 of it, within a fair share of 1/8."""

FLOODS = [("burst", 1.5, 0.5), ("sustained", 1.2, 1.0)]
"""(name, the heavy client's load in units of the cluster's capacity for its requests, the
fraction of the run it floods, centred)."""


# ---------------------------------------------------------------------------- (a) simulator


def part_a(quick: bool) -> tuple[list[dict[str, Any]], str]:
    rows = part_a_steady(quick) + part_a_flood(quick)
    return rows, table_a([r for r in rows if r["workload"] == "steady"]) + "\n\n" + table_flood(
        [r for r in rows if r["workload"] != "steady"]
    )


def run_policies(
    requests: list[SimRequest], n: int, config: SimConfig, tag: str
) -> list[tuple[str, str, ClusterSummary]]:
    """Every policy of ``POLICIES`` on ``n`` fresh replicas: ``(label, local, summary)``."""
    pm = PluginManager(load_entrypoints=False)
    out = []
    for label, router, options, local in POLICIES:
        replicas = [ReplicaSpec(f"r{i}", pm.schedulers.get(local)(), config) for i in range(n)]
        t0 = time.perf_counter()
        s = summarize_cluster(
            simulate_cluster(requests, pm.routers.get(router)(**options), replicas)
        )
        print(
            f"(a) {tag} {label:<26} worst p99 {s.worst_client_p99_latency:.3f}"
            f" hit {s.cache_hit_rate:.2f} imb {s.load_imbalance:.2f}"
            f" ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
        out.append((label, local, s))
    return out


def part_a_steady(quick: bool) -> list[dict[str, Any]]:
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
            for label, local, s in run_policies(requests, n, config, f"steady n={n} load={load}"):
                rows.append(
                    {
                        "workload": "steady",
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
    return rows


def flood_workload(
    n: int, config: SimConfig, num_light: int, flood: float, window: float
) -> tuple[list[SimRequest], dict[str, float]]:
    """Light clients ``client1..7`` within their fair share; ``client0`` floods the cluster.

    Both parts are ``zipf-clients`` draws (their own documents). Each is scaled against the
    cluster's capacity for *its own* requests (FCFS saturated, ``n`` replicas): the heavy
    client's documents are few and hot, so its requests are cheaper than the light ones.
    """
    light = make_workload(
        "zipf-clients",
        seed=0,
        num_requests=num_light,
        clients=LIGHT_CLIENTS,
        client_skew=LIGHT_SKEW,
        **FLOOD_COMMON,
    )
    light_cap = n * measure_capacity(light.requests, config)
    light_reqs = [
        replace(r, rid=f"l{r.rid}", client=f"client{int(r.client.removeprefix('client')) + 1}")
        for r in light.scaled(LIGHT_LOAD * light_cap).requests
    ]
    span = light_reqs[-1].arrival
    probe = make_workload("zipf-clients", seed=1, num_requests=400, clients=1, **FLOOD_COMMON)
    heavy_rate = flood * n * measure_capacity(probe.requests, config)
    heavy = make_workload(
        "zipf-clients",
        seed=1,
        num_requests=max(2, round(heavy_rate * window * span)),
        clients=1,
        **FLOOD_COMMON,
    ).scaled(heavy_rate)
    start = (1 - window) / 2 * span
    heavy_reqs = [replace(r, rid=f"h{r.rid}", arrival=start + r.arrival) for r in heavy.requests]
    requests = sorted(light_reqs + heavy_reqs, key=lambda r: r.arrival)
    shares = np.bincount([int(r.client.removeprefix("client")) for r in light_reqs])
    info = {
        "span_s": span,
        "light_capacity_rps": light_cap,
        "heavy_rate_rps": heavy_rate,
        "heavy_requests": len(heavy_reqs),
        "light_requests": len(light_reqs),
        "busiest_light_share": LIGHT_LOAD * float(shares.max()) / len(light_reqs),
    }
    return requests, info


def part_a_flood(quick: bool) -> list[dict[str, Any]]:
    num_light = 300 if quick else 600
    sizes = [4] if quick else [4, 8]
    floods = FLOODS[:1] if quick else FLOODS
    config = SimConfig(kv_tokens=32_768)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for name, flood, window in floods:
            requests, info = flood_workload(n, config, num_light * n // 4, flood, window)
            print(f"(a) flood {name} n={n}: {info}", flush=True)
            for label, local, s in run_policies(requests, n, config, f"{name} n={n}"):
                light = {c: v.latency.p99 for c, v in s.clients.items() if c != "client0"}
                worst = max(light, key=lambda c: light[c] or 0.0)
                heavy = s.clients["client0"]
                rows.append(
                    {
                        "workload": name,
                        "replicas": n,
                        "load": flood,
                        "policy": label,
                        "local": local,
                        "worst_p99": light[worst],
                        "worst_client": worst,
                        "heavy_p99": heavy.latency.p99,
                        "light_p99_ttft": max(
                            v.ttft.p99 or 0.0 for c, v in s.clients.items() if c != "client0"
                        ),
                        "p99": s.latency.p99,
                        "imbalance": s.load_imbalance,
                        "hit": s.cache_hit_rate,
                        "rps": s.throughput_rps,
                        "per_client_p99": {c: v.latency.p99 for c, v in s.clients.items()},
                        **info,
                    }
                )
    return rows


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


def table_flood(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| flood | replicas | policy | local | worst light-client P99 (s) | heavy client P99 | "
        "light P99 TTFT | load imbalance | hit rate |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} {r['load']:g}x | {r['replicas']} | `{r['policy']}` | {r['local']} "
            f"| {r['worst_p99']:.3f} ({r['worst_client']}) | {r['heavy_p99']:.3f} | "
            f"{r['light_p99_ttft']:.3f} | {r['imbalance']:.2f} | {r['hit']:.3f} |"
        )
    lines.append("")
    for key in dict.fromkeys((r["workload"], r["load"], r["replicas"]) for r in rows):
        by = {r["policy"]: r for r in rows if (r["workload"], r["load"], r["replicas"]) == key}
        ca, d2, rr = by["cache_aware"], by["d2lpm"], by["round_robin"]
        cd = by["cache_aware + dlpm"]
        lines.append(
            f"* {key[0]} {key[1]:g}x, {key[2]} replicas ({d2['light_requests']} light + "
            f"{d2['heavy_requests']} heavy requests over {d2['span_s']:.1f} s; busiest light "
            f"client {d2['busiest_light_share']:.3f} of capacity): cache_aware / d2lpm worst "
            f"light-client P99 = {ca['worst_p99'] / d2['worst_p99']:.2f}x "
            f"(cache_aware + dlpm / d2lpm = {cd['worst_p99'] / d2['worst_p99']:.2f}x); "
            f"d2lpm hit rate {d2['hit']:.3f} vs round_robin {rr['hit']:.3f}"
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
    # A replica saturated on purpose answers /health late; it is still up (the default 2 s
    # timeout took whole replicas out of rotation in the flood, turning delay into 503s).
    args = ["route", "--port", "0", "--policy", policy, "--health-interval", "1"]
    args += ["--health-timeout", "30"]
    for u in urls:
        args += ["--replica", u]
    for k, v in options.items():
        args += ["--policy-opt", f"{k}={v}"]
    return Proc(args, r"routing on (http://\S+) \(")


HttpWork = list[tuple[float, str, str, int]]
"""``(offset s, client, prompt, max_tokens)`` per request, in arrival order."""

HTTP_COMMON = {
    "prefixes_per_client": 2,
    "prefix_len": [200, 300],
    "suffix_len": [20, 60],
    "output_len": [2, 6],
}
HTTP_FLOOD = {
    "prefixes_per_client": 2,
    "prefix_len": [1500, 2000],
    "suffix_len": [40, 80],
    "output_len": [4, 8],
}
"""Longer documents than the steady run's, so that the replicas' engines (not the HTTP path,
which serves requests first come first served) are what the flood saturates."""
KV_FLOOD_B = 8192


def as_text(requests: list[SimRequest]) -> HttpWork:
    """Token ids to letters and spaces (equal prefixes stay equal), offsets from 0."""
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    t0 = requests[0].arrival
    return [
        (r.arrival - t0, r.client, "".join(alphabet[r.prompt % len(alphabet)]), r.output_len)
        for r in requests
    ]


def http_workload(n: int, seed: int, rate: float) -> HttpWork:
    """The steady workload in text, scaled for CPU: 6 clients, ``client_skew`` 1.5."""
    w = make_workload(
        "zipf-clients", seed=seed, num_requests=n, clients=6, client_skew=1.5, **HTTP_COMMON
    )
    return as_text(w.scaled(rate).requests)


def http_flood(n_light: int, light_rate: float, heavy_rate: float, seed: int) -> HttpWork:
    """The flood workload in text: 5 light clients (skew 0.5) at ``light_rate`` in all, and
    ``client0`` at ``heavy_rate`` during the middle half of the run."""
    light = make_workload(
        "zipf-clients", seed=seed, num_requests=n_light, clients=5, client_skew=0.5, **HTTP_FLOOD
    ).scaled(light_rate)
    light_reqs = [
        replace(r, rid=f"l{r.rid}", client=f"client{int(r.client.removeprefix('client')) + 1}")
        for r in light.requests
    ]
    span = light_reqs[-1].arrival
    heavy = make_workload(
        "zipf-clients",
        seed=seed + 1,
        num_requests=max(2, round(heavy_rate * span / 2)),
        clients=1,
        **HTTP_FLOOD,
    ).scaled(heavy_rate)
    heavy_reqs = [replace(r, rid=f"h{r.rid}", arrival=span / 4 + r.arrival) for r in heavy.requests]
    return as_text(sorted(light_reqs + heavy_reqs, key=lambda r: r.arrival))


async def drive(url: str, work: HttpWork, *, all_at_once: bool = False) -> dict[str, Any]:
    """Send ``work`` at its offsets (or all at once); per-client P99, hit rate, throughput."""
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

    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(
            *(one(session, 0.0 if all_at_once else a, c, p, k) for a, c, p, k in work)
        )
    elapsed = time.perf_counter() - t0
    ok = [r for r in results if r[2] == 200]
    per_client: dict[str, float] = {}
    for c in sorted({r[0] for r in ok}):
        per_client[c] = float(np.percentile([r[1] for r in ok if r[0] == c], 99))
    prompt = sum(r[3] for r in ok)
    return {
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "statuses": dict(Counter(r[2] for r in results)),
        "worst_p99": max(per_client.values()),
        "worst_client": max(per_client, key=per_client.__getitem__),
        "p99": float(np.percentile([r[1] for r in ok], 99)),
        "hit": sum(r[4] for r in ok) / prompt if prompt else 0.0,
        "rps": len(ok) / elapsed,
        "per_client_p99": per_client,
    }


B_POLICIES = [
    "round_robin",
    "least_load",
    "cache_aware",
    "cache_aware + dlpm",
    "d2lpm",
    "d2lpm + lpm",
]
KV_TOKENS_B = 2048


def with_cluster(
    router: str, options: dict[str, Any], local: str, run: Any, kv_tokens: int = KV_TOKENS_B
) -> Any:
    """Three fresh replicas and a router; ``run(url)``; everything stopped afterwards."""
    replicas = [start_replica(local, kv_tokens) for _ in range(3)]
    try:
        if router == "d2lpm":  # text keys are 3-character blocks, the demo model's tokens bytes
            options = {**options, "cache_tokens": kv_tokens // 3}
        proxy = start_router([r.url for r in replicas], router, options)
        try:
            result = run(proxy.url)
        finally:
            proxy.stop()
        if isinstance(result, dict):
            result["out_of_rotation"] = sum("out of rotation" in line for line in proxy.lines)
        return result
    finally:
        for r in replicas:
            r.stop()


def run_b(work: HttpWork, tag: str, kv_tokens: int = KV_TOKENS_B) -> list[dict[str, Any]]:
    rows = []
    for label, router, options, local in POLICIES:
        if label not in B_POLICIES or (tag == "steady" and "+" in label):
            continue
        t0 = time.perf_counter()
        res = with_cluster(
            router, options, local, lambda url: asyncio.run(drive(url, work)), kv_tokens
        )
        res.update(policy=label, local=local, workload=tag)
        if tag == "flood":
            light = {c: v for c, v in res["per_client_p99"].items() if c != "client0"}
            res["worst_client"] = max(light, key=light.__getitem__)
            res["worst_p99"] = light[res["worst_client"]]
            res["heavy_p99"] = res["per_client_p99"].get("client0", float("nan"))
        rows.append(res)
        print(
            f"(b) {tag} {label:<14} worst p99 {res['worst_p99']:.3f} hit {res['hit']:.3f} "
            f"ok {res['ok']} failed {res['failed']} {res['statuses']} out of rotation "
            f"{res['out_of_rotation']}x ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    return rows


def part_b(quick: bool, workloads: list[str]) -> tuple[list[dict[str, Any]], str]:
    rows: list[dict[str, Any]] = []
    text: list[str] = []
    if "steady" in workloads:
        n, rate = (60, 6.0) if quick else (240, 6.0)
        steady = run_b(http_workload(n, seed=1, rate=rate), "steady")
        rows += steady
        text += [
            f"Steady: 3 replicas (demo model, CPU, 1 torch thread each, KV 2,048 tokens), {n} "
            f"requests at {rate:g} req/s:",
            "",
            "| policy | local | worst client P99 latency (s) | P99 latency | hit rate "
            "| ok / failed |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in steady:
            text.append(
                f"| `{r['policy']}` | {r['local']} | {r['worst_p99']:.3f} ({r['worst_client']}) "
                f"| {r['p99']:.3f} | {r['hit']:.3f} | {r['ok']} / {r['failed']} |"
            )
        text.append("")
    if "flood" in workloads:
        # Capacity: the heavy client's kind of requests all at once, through round_robin.
        probe = make_workload(
            "zipf-clients", seed=3, num_requests=60 if quick else 240, clients=1, **HTTP_FLOOD
        )
        burst = as_text(probe.requests)
        cap = with_cluster(
            "round_robin",
            {},
            "lpm",
            lambda url: asyncio.run(drive(url, burst, all_at_once=True)),
            KV_FLOOD_B,
        )["rps"]
        n_light = 15 if quick else 40
        light_rate, heavy_rate = 0.05 * cap, 1.5 * cap
        work = http_flood(n_light, light_rate, heavy_rate, seed=1)
        flood = run_b(work, "flood", KV_FLOOD_B)
        rows += flood
        text += [
            f"Flood: 3 replicas (demo model, CPU, 1 torch thread each, KV {KV_FLOOD_B:,} "
            f"tokens), 1,500-2,000-character documents; capacity for the heavy client's "
            f"requests measured first ({cap:.1f} req/s, {len(burst)} requests at once through "
            f"round_robin); 5 light clients at {light_rate:.2f} req/s in all ({n_light} "
            f"requests), the heavy client at {heavy_rate:.1f} req/s during the middle half "
            f"({len(work) - n_light} requests):",
            "",
            "| policy | local | worst light-client P99 (s) | heavy client P99 | hit rate "
            "| ok / failed |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in flood:
            text.append(
                f"| `{r['policy']}` | {r['local']} | {r['worst_p99']:.3f} ({r['worst_client']}) "
                f"| {r['heavy_p99']:.3f} | {r['hit']:.3f} | {r['ok']} / {r['failed']} |"
            )
        by = {r["policy"]: r for r in flood}
        text.append(
            f"\n* cache_aware / d2lpm worst light-client P99 = "
            f"{by['cache_aware']['worst_p99'] / by['d2lpm']['worst_p99']:.2f}x"
        )
    return rows, "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT, help="where the tables go")
    ap.add_argument("--b-workloads", default="flood", help="part (b): comma-separated steady,flood")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = (
        ("a", "Simulator", lambda: part_a(args.quick)),
        ("b", "Three real replicas", lambda: part_b(args.quick, args.b_workloads.split(","))),
    )
    for part, title, run in runs:
        if part not in args.parts:
            continue
        rows, table = run()
        text = f"## ({part}) {title}\n\n{table}\n"
        (args.out / f"routing_{part}.md").write_text(text)
        (args.out / f"routing_{part}.json").write_text(json.dumps(rows, indent=1))
        print(text)


if __name__ == "__main__":
    main()
