"""One scheduling round of each built-in policy at 1,024 and 8,192 waiting requests.

A round is what the engine does before admitting: refresh every waiting request's
``matched_len`` against the radix cache (``RadixCache.match_prefix``, policy-independent), then
call ``order()``. Both parts are timed separately per round with ``perf_counter_ns``; GC is off
while timing. Between rounds (untimed) the first 16 requests of the order are admitted and
reported through ``on_step`` and 16 fresh requests arrive, so stateful policies (k-LPM's cycle,
VTC's counters, DLPM's deficits and refills) run as they would in the engine.

Workload: 8 clients; 64 shared 256-token system prompts (half of them cached), each request a
system prompt plus 32-256 unique tokens; a quarter of the requests re-send a cached prompt and
match it almost entirely. Matched lengths therefore spread over 0, ~256 and ~prompt length.

Targets (``order()`` of lpm/klpm/dlpm): <= 2 ms at 1,024 waiting, <= 15 ms at 8,192. The
baseline is FCFS (one sort) in the same run; the ratio to it is printed.

    python benchmarks/scheduler_round.py            # full run (about a minute on 2 cores)
    python benchmarks/scheduler_round.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Let `python benchmarks/scheduler_round.py` work from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmserve.cache.kv_pool import SlotAllocator
from slmserve.cache.radix import RadixCache
from slmserve.interfaces import Scheduler
from slmserve.schedulers.dlpm import DLPM
from slmserve.schedulers.fcfs import FCFS
from slmserve.schedulers.klpm import KLPM
from slmserve.schedulers.lpm import LPM
from slmserve.schedulers.vtc import VTC
from slmserve.types import SchedRequest, StepReport

VOCAB = 151_936
GROUPS, SYSTEM_LEN, CLIENTS, ADMIT = 64, 256, 8, 16
TARGET_MS = {1024: 2.0, 8192: 15.0}
TARGETED = ("lpm-ideal", "klpm", "dlpm")

POLICIES: dict[str, Callable[[], Scheduler]] = {
    "fcfs": FCFS,
    "lpm": LPM,  # SGLang mode: above 128 waiting this *is* FCFS (the fallback)
    "lpm-ideal": lambda: LPM(mode="ideal"),
    "klpm": lambda: KLPM(k=4),
    "vtc": VTC,
    "dlpm": lambda: DLPM(quantum=2048),
}


class Workload:
    """A seeded stream of requests over shared system prompts, and a cache holding some."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.systems = [self.rng.integers(0, VOCAB, SYSTEM_LEN) for _ in range(GROUPS)]
        self.cache = RadixCache(SlotAllocator(4_000_000))
        self.cached_prompts: list[np.ndarray] = []
        for system in self.systems[: GROUPS // 2]:
            self._insert(system)
        self.count = 0

    def _insert(self, tokens: np.ndarray) -> None:
        result = self.cache.insert(tokens, self.cache.allocator.alloc(len(tokens)))
        assert result.prefix_len <= len(tokens)

    def request(self, now: float) -> tuple[SchedRequest, np.ndarray]:
        rng = self.rng
        if self.cached_prompts and rng.random() < 0.25:
            tokens = self.cached_prompts[int(rng.integers(len(self.cached_prompts)))]
        else:
            system = self.systems[int(rng.integers(GROUPS))]
            tail = rng.integers(0, VOCAB, int(rng.integers(32, 257)))
            tokens = np.concatenate([system, tail])
            if len(self.cached_prompts) < 512:
                self._insert(tokens)
                self.cached_prompts.append(tokens)
        self.count += 1
        r = SchedRequest(
            f"r{self.count:07d}",
            tokens.tolist(),
            arrival_time=now + self.count * 1e-6,  # distinct, like time.monotonic()
            client_id=f"c{int(rng.integers(CLIENTS))}",
            max_new_tokens=64,
        )
        return r, tokens


def bench(name: str, n: int, rounds: int, seed: int) -> tuple[list[float], list[float]]:
    """Per-round (refresh ms, order ms) for one policy at ``n`` waiting requests."""
    sched = POLICIES[name]()
    work = Workload(seed)
    waiting: dict[str, tuple[SchedRequest, np.ndarray]] = {}
    for _ in range(n):
        r, tokens = work.request(0.0)
        waiting[r.rid] = (r, tokens)
        sched.on_arrival(r, 0.0)
    refresh_ms, order_ms = [], []
    for i in range(rounds + 1):  # round 0 is the warm-up
        now = float(i + 1)
        gc.collect()
        gc.disable()
        t0 = time.perf_counter_ns()
        for r, tokens in waiting.values():
            r.matched_len = min(work.cache.match_prefix(tokens).length, r.prompt_len - 1)
        t1 = time.perf_counter_ns()
        order = sched.order([r for r, _ in waiting.values()], now)
        t2 = time.perf_counter_ns()
        gc.enable()
        if i:
            refresh_ms.append((t1 - t0) / 1e6)
            order_ms.append((t2 - t1) / 1e6)
        admitted = order[:ADMIT]
        computed = {r.rid: (r.client_id, r.prompt_len - r.matched_len, 1) for r in admitted}
        sched.on_step(StepReport(now=now, admitted=[r.rid for r in admitted], computed=computed))
        for r in admitted:
            del waiting[r.rid]
        for _ in range(ADMIT):
            r, tokens = work.request(now)
            waiting[r.rid] = (r, tokens)
            sched.on_arrival(r, now)
    return refresh_ms, order_ms


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] if len(xs) >= 2 else xs[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per policy and size")
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}; GC off while timing")
    print("refresh = radix match_prefix over the whole queue (engine work, same for every policy)")
    failures = []
    for n in (1024, 8192):
        rounds = args.rounds or (10 if args.quick else (200 if n == 1024 else 60))
        print(
            f"\n{n} waiting, {rounds} rounds; target for order() of {', '.join(TARGETED)}: "
            f"<= {TARGET_MS[n]:g} ms"
        )
        print(
            f"{'policy':<10} {'order mean':>10} {'order p99':>10} {'x fcfs':>7} "
            f"{'refresh mean':>12} {'round mean':>10} {'round p99':>10}"
        )
        base = None
        for name in POLICIES:
            refresh, order = bench(name, n, rounds, args.seed)
            total = [a + b for a, b in zip(refresh, order)]
            mean = statistics.fmean(order)
            base = base or mean
            print(
                f"{name:<10} {mean:>10.3f} {p99(order):>10.3f} {mean / base:>7.2f} "
                f"{statistics.fmean(refresh):>12.3f} {statistics.fmean(total):>10.3f} "
                f"{p99(total):>10.3f}"
            )
            if name in TARGETED and p99(order) > TARGET_MS[n]:
                failures.append(f"{name} at {n}: order() p99 {p99(order):.2f} ms")
    print("\nall order() targets met" if not failures else "\nMISSED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
