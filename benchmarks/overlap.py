"""Overlap scheduling: how much of the host's per-step work hides behind the device's.

On a GPU a step's kernels are launched in milliseconds and run for tens; without overlap the
device then idles while the host collects the results, accounts the step, emits the outputs and
plans the next step. With ``EngineConfig.overlap`` the next step is planned and launched before
the current one's results are back (a decode taking its input token from the step before, on
the device), so the device always has a step queued.

This measures that without a GPU: the ``null`` backend with ``device_seconds_per_token`` stands
in for an asynchronous device that takes that long per token (its forward returns at once; the
wait for a step's results sleeps until the "device" is done, in launch order). Everything else
is the real engine: the scheduler, the radix cache, flattening, the worker thread, scoring.

Workload: the GPU benchmark's scoring shape: requests of one fresh 200-token query and 10 fresh
items of 300 tokens, all submitted at once (closed loop); items/s over the whole burst. Device
speeds are given in items/s of this workload (320 tokens an item: 300 of its own and a tenth of
its query); 2,700 items/s is the compute ceiling of a Qwen3-0.6B-shaped model on an H100
(`benchmarks/gpu.py` computes it). The KV pool holds the whole burst, so every item costs the
device exactly those tokens. Printed per speed: overlap off and on (median of the rounds, taking
turns), their ratio, the share of the wall time the device was busy, the host alone (an
infinitely fast device), and two bounds: ``serial`` = 1 / (1/host + 1/device), the best
without overlap, and ``ideal`` = min(host, device).
A last row runs the demo model on the CPU, where the forward pass *is* the launch (nothing to
hide; it checks that overlap costs nothing there).

Part 2, generation: ``--concurrency`` requests at once (64 and 256, as in the GPU benchmark),
each a fresh 128-token prompt and 128 greedy output tokens. The device is modelled per step, as a
decode step of a small model is: a fixed cost (weight reads, launches; ``--decode-step-ms``)
plus 1.2 us per token (the scoring ceiling's rate, which prices the prefills). Printed: output
tokens/s off and on, their ratio, the device's busy share, and the host alone.

    python benchmarks/overlap.py                 # ~2 min
    python benchmarks/overlap.py --rounds 1 --requests 100 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout
from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect

ITEMS, ITEM_TOKENS, QUERY_TOKENS = 10, 300, 200
TOKENS_PER_ITEM = ITEM_TOKENS + QUERY_TOKENS / ITEMS
LABELS = (9, 10)
PROMPT_TOKENS, OUTPUT_TOKENS = 128, 128
DEVICE_SECONDS_PER_TOKEN = 1.2e-6

Request = tuple[list[int], list[list[int]]]


def make_requests(n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(11, 250) for _ in range(k)]

    return [(ids(QUERY_TOKENS), [ids(ITEM_TOKENS) for _ in range(ITEMS)]) for _ in range(n)]


async def burst(config: EngineConfig, reqs: list[Request]) -> tuple[float, float]:
    """Items/s of the whole burst, and the share of the wall time the (simulated) device was
    busy: its tokens times its seconds per token, over the elapsed time."""
    async with Engine(config) as engine:
        warm = make_requests(2, seed=-1)
        await asyncio.gather(*(engine.score(q, it, label_token_ids=LABELS) for q, it in warm))
        tokens0 = engine.times.tokens
        start = time.perf_counter()
        await asyncio.gather(*(engine.score(q, it, label_token_ids=LABELS) for q, it in reqs))
        elapsed = time.perf_counter() - start
        assert engine.core is not None
        engine.core.check_integrity()
        spt = config.backend_options.get("device_seconds_per_token", 0.0)
        busy = (engine.times.tokens - tokens0) * spt / elapsed
    return len(reqs) * ITEMS / elapsed, busy


async def generation_burst(config: EngineConfig, n: int, seed: int) -> tuple[float, float]:
    """Output tokens/s of ``n`` concurrent greedy requests, and the device's busy share."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(11, 250) for _ in range(PROMPT_TOKENS)] for _ in range(n)]
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    async with Engine(config) as engine:
        await collect(engine.submit([5, 6, 7], params))  # warm-up
        steps0, tokens0 = engine.times.steps, engine.times.tokens
        start = time.perf_counter()
        results = await asyncio.gather(*(collect(engine.submit(p, params)) for p in prompts))
        elapsed = time.perf_counter() - start
        assert engine.core is not None
        engine.core.check_integrity()
        opts = config.backend_options
        device = (engine.times.steps - steps0) * opts.get("device_seconds_per_step", 0.0)
        device += (engine.times.tokens - tokens0) * opts.get("device_seconds_per_token", 0.0)
    assert all(len(r.token_ids) == OUTPUT_TOKENS for r in results)
    return n * OUTPUT_TOKENS / elapsed, device / elapsed


async def compare_generation(
    args: argparse.Namespace, n: int, step_ms: float
) -> dict[str, tuple[float, float]]:
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    options = {"device_seconds_per_step": step_ms / 1e3}
    if step_ms:
        options["device_seconds_per_token"] = DEVICE_SECONDS_PER_TOKEN
    for r in range(args.rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            config = EngineConfig(
                backend="null",
                backend_options=options,
                kv_tokens=2 * n * (PROMPT_TOKENS + OUTPUT_TOKENS) + 4096,
                max_running_requests=max(n, 8),
                max_waiting_requests=1 << 16,
                overlap=mode,  # type: ignore[arg-type]
            )
            runs[mode].append(await generation_burst(config, n, seed=r))
    return {
        mode: (statistics.median(x for x, _ in v), statistics.median(s for _, s in v))
        for mode, v in runs.items()
    }


async def generation(args: argparse.Namespace) -> None:
    print(
        f"\ngeneration: N concurrent requests x {PROMPT_TOKENS}-token prompt x "
        f"{OUTPUT_TOKENS} greedy tokens; device = fixed ms per step + "
        f"{DEVICE_SECONDS_PER_TOKEN * 1e6:.1f} us per token; median of {args.rounds} rounds\n"
    )
    print("| concurrent | device ms/step | overlap off tok/s | overlap on tok/s | on / off "
          "| device busy off / on |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for n in args.concurrency:
        host = (await compare_generation(args, n, 0.0))["off"][0]
        print(f"| {n} | host alone | {host:,.0f} | - | - | - |", flush=True)
        for step_ms in args.decode_step_ms:
            res = await compare_generation(args, n, step_ms)
            (off, busy_off), (on, busy_on) = res["off"], res["on"]
            print(
                f"| {n} | {step_ms:g} | {off:,.0f} | {on:,.0f} | {on / off:.2f}x "
                f"| {busy_off:.0%} / {busy_on:.0%} |",
                flush=True,
            )


def config(args: argparse.Namespace, overlap: str, device_rate: float | None) -> EngineConfig:
    common = {
        # Room for the whole burst: no query prefix is evicted before its items run, so the
        # device computes each item's 320 tokens exactly once.
        "kv_tokens": 400_000 if device_rate is None else 2 * args.requests * 3_500,
        "max_batch_tokens": args.max_batch_tokens,
        "chunked_prefill_size": args.max_batch_tokens,
        "max_running_requests": 256,
        "max_waiting_requests": 1 << 16,
        "overlap": overlap,
    }
    if device_rate is None:  # the demo model, computed on the CPU
        return EngineConfig(device="cpu", dtype="float32", **common)
    spt = 1.0 / (device_rate * TOKENS_PER_ITEM) if device_rate > 0 else 0.0
    return EngineConfig(backend="null", backend_options={"device_seconds_per_token": spt}, **common)


async def compare(
    args: argparse.Namespace, device_rate: float | None, n: int
) -> dict[str, tuple[float, float]]:
    """Median items/s (and device-busy share) per mode, modes taking turns each round."""
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for r in range(args.rounds):
        reqs = make_requests(n, seed=r)
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            runs[mode].append(await burst(config(args, mode, device_rate), reqs))
    return {
        mode: (statistics.median(x for x, _ in v), statistics.median(s for _, s in v))
        for mode, v in runs.items()
    }


async def main(args: argparse.Namespace) -> None:
    if args.scoring:
        await scoring(args)
    if args.concurrency:
        await generation(args)


async def scoring(args: argparse.Namespace) -> None:
    print(
        f"scoring bursts of {args.requests} requests x {ITEMS} items x {ITEM_TOKENS} tokens "
        f"({QUERY_TOKENS}-token query), max_batch_tokens {args.max_batch_tokens}, "
        f"median of {args.rounds} rounds\n"
    )
    host = (await compare(args, 0.0, args.requests))["off"][0]
    print(f"host alone (null backend, no device time): {host:,.0f} items/s\n")
    print("| device items/s | overlap off | overlap on | on / off | device busy off / on "
          "| serial bound | ideal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for rate in args.device_rates:
        res = await compare(args, rate, args.requests)
        (off, busy_off), (on, busy_on) = res["off"], res["on"]
        serial = 1 / (1 / host + 1 / rate)
        print(
            f"| {rate:,.0f} | {off:,.0f} | {on:,.0f} | {on / off:.2f}x "
            f"| {busy_off:.0%} / {busy_on:.0%} | {serial:,.0f} | {min(host, rate):,.0f} |",
            flush=True,
        )
    if args.cpu_model:
        res = await compare(args, None, args.cpu_requests)
        (off, _), (on, _) = res["off"], res["on"]
        print(f"| demo model on the CPU | {off:,.0f} | {on:,.0f} | {on / off:.2f}x | - | - | - |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="requests per burst")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--device-rates", type=float, nargs="+", default=[1500.0, 2700.0, 5000.0],
        help="simulated device speeds, items/s",
    )  # fmt: skip
    ap.add_argument("--max-batch-tokens", type=int, default=16_384)
    ap.add_argument("--no-cpu-model", dest="cpu_model", action="store_false")
    ap.add_argument("--cpu-requests", type=int, default=8, help="requests per CPU-model burst")
    ap.add_argument("--no-scoring", dest="scoring", action="store_false")
    ap.add_argument(
        "--concurrency", type=int, nargs="*", default=[64, 256],
        help="generation: concurrent requests (none: skip the generation part)",
    )  # fmt: skip
    ap.add_argument(
        "--decode-step-ms", type=float, nargs="+", default=[1.0, 2.0, 4.0],
        help="generation: simulated device time per step, ms (plus 1.2 us per token)",
    )  # fmt: skip
    return ap.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
