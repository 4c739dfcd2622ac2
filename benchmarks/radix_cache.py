"""Micro-benchmark of ``slmserve.cache.radix.RadixCache`` on scoring and multi-turn chat replays.

Follows the protocol of shared/research/engines.md §1.6: per request ``match -> lock ->
allocate the uncached tail -> insert -> unlock -> evict the overflow past a capacity``, each
operation timed separately with ``perf_counter_ns``, workloads generated up front from a seeded
RNG, GC disabled while timing, one warm-up pass, then the median over repeats of each statistic.

    python benchmarks/radix_cache.py            # full run (about a minute on 2 cores)
    python benchmarks/radix_cache.py --quick    # seconds

SGLang is not a dependency; its figures below are quoted, not measured here.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Let `python benchmarks/radix_cache.py` work from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmserve.cache.kv_pool import SlotAllocator
from slmserve.cache.radix import RadixCache

VOCAB = 151_936
OPS = ("match", "lock", "alloc", "insert", "unlock", "evict")

# SGLang 0.5.23 RadixCache, page size 1, scoring workload, 2-core CPU VM, GC off (mean µs).
SGLANG_REFERENCE_US = {"match": 18.7, "insert": 48.0, "evict": 176.8}
TARGET_SPEEDUP = 3.0


def scoring_workload(
    rng: np.random.Generator, queries: int, items: int, prefix: int = 200
) -> list[np.ndarray]:
    """``queries`` × ``items`` requests: a per-query prefix plus an item of 100–500 tokens."""
    reqs = []
    for _ in range(queries):
        q = rng.integers(0, VOCAB, prefix, dtype=np.int64)
        for _ in range(items):
            item = rng.integers(0, VOCAB, int(rng.integers(100, 501)), dtype=np.int64)
            reqs.append(np.concatenate([q, item]))
    return reqs


def chat_workload(
    rng: np.random.Generator, sessions: int, turns: int, system: int = 1500
) -> list[np.ndarray]:
    """Sessions that re-send their whole history, each turn adding 50–300 tokens.

    Turns are interleaved: every round visits the sessions in a fresh random order.
    """
    sys_prompt = rng.integers(0, VOCAB, system, dtype=np.int64)
    history = [sys_prompt] * sessions
    reqs = []
    for _ in range(turns):
        for s in rng.permutation(sessions):
            turn = rng.integers(0, VOCAB, int(rng.integers(50, 301)), dtype=np.int64)
            history[s] = np.concatenate([history[s], turn])
            reqs.append(history[s])
    return reqs


def replay(reqs: list[np.ndarray], capacity: int) -> tuple[dict[str, list[int]], float]:
    """Run the request protocol once on a fresh cache; return per-op ns samples, hit ratio."""
    max_len = max(len(r) for r in reqs)
    alloc = SlotAllocator(capacity + 2 * max_len)
    cache = RadixCache(alloc)
    samples: dict[str, list[int]] = {op: [] for op in OPS}
    m_, l_, a_, i_, u_, e_ = (samples[op].append for op in OPS)
    clock = time.perf_counter_ns
    hit = total = 0
    gc.collect()
    gc.disable()
    try:
        for tokens in reqs:
            t0 = clock()
            m = cache.match_prefix(tokens)
            t1 = clock()
            cache.lock(m.node)
            t2 = clock()
            tail = alloc.alloc(len(tokens) - m.length)
            slots = np.concatenate([m.slots, tail])
            t3 = clock()
            cache.insert(tokens, slots)
            t4 = clock()
            cache.unlock(m.node)
            t5 = clock()
            m_(t1 - t0)
            l_(t2 - t1)
            a_(t3 - t2)
            i_(t4 - t3)
            u_(t5 - t4)
            over = cache.total_size - capacity
            if over > 0:
                t6 = clock()
                cache.evict(over)
                e_(clock() - t6)
            hit += m.length
            total += len(tokens)
    finally:
        gc.enable()
    cache.check_integrity()
    return samples, hit / total


def _stats(ns: list[int]) -> tuple[float, float, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


def run(
    name: str, make: Callable[[], list[np.ndarray]], capacity: int, repeats: int
) -> dict[str, float]:
    reqs = make()
    replay(reqs[: max(1, len(reqs) // 10)], capacity)  # warm-up
    runs = [replay(reqs, capacity) for _ in range(repeats)]
    hit = runs[0][1]
    ntok = sum(len(r) for r in reqs)
    print(
        f"\n{name}: {len(reqs)} requests, {ntok:,} tokens, capacity {capacity:,}, "
        f"hit ratio {hit:.3f}, median of {repeats} run(s)"
    )
    print(f"{'op':<8}{'calls':>8}{'mean µs':>10}{'p50 µs':>9}{'p99 µs':>9}")
    means = {}
    for op in OPS:
        calls = len(runs[0][0][op])
        if not calls:
            print(f"{op:<8}{0:>8}{'-':>10}{'-':>9}{'-':>9}")
            continue
        per_run = [_stats(s[op]) for s, _ in runs]
        mean, p50, p99 = (statistics.median(col) for col in zip(*per_run))
        means[op] = mean
        print(f"{op:<8}{calls:>8}{mean:>10.2f}{p50:>9.2f}{p99:>9.2f}")
    return means


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="small workloads, one repeat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capacity", type=int, default=300_000, help="cache capacity in tokens")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per workload")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    queries, items = (10, 50) if args.quick else (50, 200)
    sessions, turns = (16, 4) if args.quick else (64, 8)
    have_sglang = importlib.util.find_spec("sglang") is not None
    print(f"sglang importable: {'yes (not compared here)' if have_sglang else 'no'}")
    # Means are sensitive to other processes on small machines; p50 much less so.
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"cpus: {os.cpu_count()}, load average before timing: {load}")

    scoring = run(
        f"scoring ({queries} queries x {items} items)",
        lambda: scoring_workload(np.random.default_rng(args.seed), queries, items),
        args.capacity,
        repeats,
    )
    run(
        f"chat ({sessions} sessions x {turns} turns)",
        lambda: chat_workload(np.random.default_rng(args.seed + 1), sessions, turns),
        args.capacity,
        repeats,
    )

    print(
        "\nvs SGLang 0.5.23 RadixCache (page 1, scoring, 2-core VM) -- reference figures "
        "from shared/research/engines.md §1.6, not measured in this run:"
    )
    print(f"{'op':<8}{'ref µs':>8}{'ours µs':>9}{'speedup':>9}  target >= {TARGET_SPEEDUP:.0f}x")
    for op, ref in SGLANG_REFERENCE_US.items():
        ours = scoring.get(op)
        if ours is None:
            print(f"{op:<8}{ref:>8.1f}{'-':>9}{'-':>9}  (no calls)")
            continue
        speedup = ref / ours
        verdict = "ok" if speedup >= TARGET_SPEEDUP else "BELOW TARGET"
        print(f"{op:<8}{ref:>8.1f}{ours:>9.2f}{speedup:>8.1f}x  {verdict}")


if __name__ == "__main__":
    main()
