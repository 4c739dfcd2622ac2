"""GPU benchmark: scoring and generation of a Qwen3-0.6B-shaped model vs transformers (sdpa).

Models (random weights, built here with ``Qwen3Config`` + ``save_pretrained``, byte tokenizer;
nothing is downloaded):

* ``qwen3-0.6b``: 28 layers, hidden 1024, 16/8 heads, head_dim 128, MLP 3072, vocab 151,936,
  tied embeddings;
* ``osscar``: the same with MLP 1536 and 4 KV heads (the OSSCAR-pruned size).

Scoring: each request is one fresh 200-token query (the shared prefix) and 10 fresh items of
300 tokens. Per system, after a warm-up:

1. capacity probe, closed loop: bursts of requests submitted at once, growing until one burst
   lasts ``--probe-seconds``; that burst's items/s is the system's capacity;
2. offered load: Poisson arrivals at fixed fractions of that capacity (``--fractions``,
   ``--duration`` seconds of arrivals each), stopping at the first level whose P99 request
   latency reaches 500 ms. Per level: achieved items/s (all items over first arrival to last
   reply) and P50/P99 latency.

The headline is the best achieved items/s with P99 < 500 ms. Every request of every phase is
fresh (its own seed), so no request reuses a prefix cached by another. The compute ceiling counts
the FLOPs of an item's tokens (2 per weight, plus attention over the query and the item) at
this card's measured bf16 matmul rate; MFU = headline / ceiling. The warm-up requests are the
same for both systems, and the table reports the largest difference of their label
probabilities (a check that the fast path computes what transformers computes; bf16 on both
sides, so small but not 0).

Generation: 64 and 256 concurrent requests (128-token prompts, 256 output tokens, greedy,
EOS ignored), output tokens/s. When the engine overlaps its steps (``--overlap``; on CUDA by
default), the same engine then runs generation again one step at a time, for the gain of
overlap on this card (~10 s more per model).

Baseline, same GPU, same requests, same run: transformers with sdpa attention. For scoring it
serves the same arrivals with dynamic batching (every waiting request's ``[query + item]`` rows,
up to ``--hf-batch`` rows, left-padded, ``logits_to_keep=1``); for generation ``generate`` on
the whole batch. Each system loads the model once and runs scoring, then generation.

Every phase prints its wall time (``[  12.3 s] phase``), so a GPU session can see where its
lease goes; after each model but the last the table so far is printed, so a run cut short
still leaves figures.

    python benchmarks/gpu.py                 # on a CUDA machine (~5 min on an H200)
    python benchmarks/gpu.py --models qwen3-0.6b
    python benchmarks/gpu.py --smoke         # tiny shapes on the CPU, a few seconds (CI)

benchmarks/gpu_check.sh runs it on the GPU machine; docs/benchmarks.md has the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout
from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect

QWEN3_06B: dict[str, Any] = {
    "num_hidden_layers": 28,
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "vocab_size": 151_936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}
MODELS = {
    "qwen3-0.6b": QWEN3_06B,
    "osscar": {**QWEN3_06B, "intermediate_size": 1536, "num_key_value_heads": 4},
}
SMOKE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 512,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
}
LABELS = (9, 10)
P99_BOUND = 0.5
# Seeds of the request sets: each phase draws its own, so no request repeats another's tokens.
WARMUP_SEED, PROBE_SEED, LEVEL_SEED = 0, 100, 1000

Request = tuple[list[int], list[list[int]]]
Scorer = Callable[[Request], Awaitable[list[float]]]


# ------------------------------------------------------------------------------ setup


class Phases:
    """Wall time per phase, printed as each ends: the GPU lease is short, and the next session
    must know which phase to shorten."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.times[name] = self.times.get(name, 0.0) + elapsed
            print(f"  [{elapsed:6.1f} s] {name}", flush=True)


def build_model(path: Path, shape: dict[str, Any], device: str, seed: int) -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    from slmserve.models.demo import write_byte_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        model = AutoModelForCausalLM.from_config(Qwen3Config(**shape), dtype=torch.bfloat16)
    model.save_pretrained(path)
    write_byte_tokenizer(path)
    del model


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large matmul in ``dtype`` on ``device`` (best of 10, after a warm-up)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def item_flops(shape: dict[str, Any], item: int, query: int) -> float:
    """FLOPs of one item's tokens: 2 per weight of the layers, plus QK^T and PV over the query
    and the causal part of the item (the label head is two rows: negligible)."""
    h, layers, d = shape["hidden_size"], shape["num_hidden_layers"], shape["head_dim"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    per_layer = 2 * h * heads * d + 2 * h * kv * d + 3 * h * shape["intermediate_size"]
    attention = 4 * layers * heads * d * (query + (item + 1) / 2)
    return item * (2 * layers * per_layer + attention)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def make_requests(n: int, args: argparse.Namespace, vocab: int, seed: int) -> list[Request]:
    """``n`` requests of fresh random tokens; the first ``k`` are the same for any ``n >= k``.
    numpy draws them: a run makes ~20,000 of 3,200 tokens, seconds with ``random``."""
    rng = np.random.default_rng(seed)
    shape = (args.items, args.item_tokens)
    return [
        (
            rng.integers(11, vocab, args.query_tokens).tolist(),
            rng.integers(11, vocab, shape).tolist(),
        )
        for _ in range(n)
    ]


# ------------------------------------------------------------------------------ scoring


@dataclass
class Scoring:
    """One system's scoring figures."""

    capacity: float = 0.0  # closed-loop burst items/s
    best: float = 0.0  # best achieved items/s with P99 < bound
    levels: list[tuple[float, float, float, float]] = field(default_factory=list)
    warmup_scores: list[list[float]] = field(default_factory=list)


async def probe(name: str, score: Scorer, args: argparse.Namespace, vocab: int) -> float:
    """Closed-loop capacity: bursts submitted at once, grown until one lasts
    ``--probe-seconds`` (or reaches ``--probe-max`` requests); that burst's items/s."""
    n, seed = args.probe_start, PROBE_SEED
    while True:
        reqs = make_requests(n, args, vocab, seed)
        start = time.perf_counter()
        await asyncio.gather(*(score(r) for r in reqs))
        elapsed = time.perf_counter() - start
        rate = n * args.items / elapsed
        print(f"  {name:14s} burst {n:6d} requests  {rate:8.0f} items/s  "
              f"in {elapsed:5.2f} s", flush=True)  # fmt: skip
        if elapsed >= args.probe_seconds or n >= args.probe_max:
            return rate
        # Aim past the target: small bursts under-fill the batches, so they run slower.
        n = min(args.probe_max, max(2 * n, math.ceil(1.3 * n * args.probe_seconds / elapsed)))
        seed += 1


async def offered_load(
    score: Scorer, reqs: list[Request], items_per_s: float, seed: int
) -> tuple[float, float, float]:
    """Poisson arrivals at ``items_per_s``; returns (achieved items/s, P50 s, P99 s)."""
    rng = random.Random(seed)
    latencies: list[float] = []

    async def one(req: Request) -> None:
        start = time.perf_counter()
        await score(req)
        latencies.append(time.perf_counter() - start)

    rate = items_per_s / len(reqs[0][1])
    tasks = []
    begin = next_at = time.perf_counter()
    for req in reqs:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(req)))
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - begin
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return sum(len(r[1]) for r in reqs) / elapsed, pick(0.5), pick(0.99)


async def sweep(
    name: str, score: Scorer, args: argparse.Namespace, vocab: int, capacity: float
) -> tuple[float, list[tuple[float, float, float, float]]]:
    """Offered loads at fractions of ``capacity`` until P99 reaches the bound; returns the best
    achieved items/s under the bound and every level's (offered, achieved, P50, P99)."""
    rows, best = [], 0.0
    for level, fraction in enumerate(args.fractions):
        offered = fraction * capacity
        n = max(args.min_requests, round(offered * args.duration / args.items))
        reqs = make_requests(n, args, vocab, LEVEL_SEED + level)
        achieved, p50, p99 = await offered_load(score, reqs, offered, level)
        rows.append((offered, achieved, p50, p99))
        print(f"  {name:14s} offered {offered:8.0f} ({fraction:4.2f})  achieved {achieved:8.0f} "
              f"items/s  p50 {p50 * 1e3:7.1f} ms  p99 {p99 * 1e3:7.1f} ms", flush=True)  # fmt: skip
        if p99 >= P99_BOUND:
            break
        best = max(best, achieved)
    return best, rows


async def measure_scoring(
    name: str, score: Scorer, args: argparse.Namespace, vocab: int, phases: Phases
) -> Scoring:
    """Warm-up (compiles kernels, fills allocator caches), capacity probe, offered-load sweep."""
    out = Scoring()
    with phases(f"{name} scoring warm-up"):
        warm = make_requests(args.warmup, args, vocab, WARMUP_SEED)
        out.warmup_scores = list(await asyncio.gather(*(score(r) for r in warm)))
    with phases(f"{name} capacity probe"):
        out.capacity = await probe(name, score, args, vocab)
    with phases(f"{name} load sweep"):
        out.best, out.levels = await sweep(name, score, args, vocab, out.capacity)
    return out


# ------------------------------------------------------------------------------ generation


def gen_workload(n: int, args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(n)
    return [[rng.randrange(11, vocab) for _ in range(args.prompt_tokens)] for _ in range(n)]


# ------------------------------------------------------------------------------ systems


def engine_config(path: Path, args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=str(path),
        device=args.device,
        dtype=args.dtype,
        kv_tokens=args.kv_tokens,
        max_batch_tokens=args.max_batch_tokens,
        chunked_prefill_size=args.max_batch_tokens,
        max_running_requests=max(256, *args.concurrency),
        max_waiting_requests=1 << 16,
        cuda_graphs=not args.no_cuda_graphs,
        overlap=args.overlap,
        backend_options={"attention": args.attention},
    )


async def run_engine(
    path: Path, args: argparse.Namespace, vocab: int, phases: Phases
) -> tuple[Scoring, dict[int, float], dict[int, float]]:
    """slmserve: one engine (model load and CUDA-graph capture once) for scoring, then
    generation; then, if its steps were overlapped, generation again one step at a time."""
    async with contextlib.AsyncExitStack() as stack:
        with phases("slmserve load + CUDA graphs"):
            engine = await stack.enter_async_context(Engine(engine_config(path, args)))

        async def score(req: Request) -> list[float]:
            result = await engine.score(req[0], req[1], label_token_ids=LABELS)
            return [s[0] for s in result.scores]

        scoring = await measure_scoring("slmserve", score, args, vocab, phases)
        params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)

        async def generation() -> dict[int, float]:
            rates = {}
            for n in args.concurrency:
                prompts = gen_workload(n, args, vocab)
                start = time.perf_counter()
                results = await asyncio.gather(
                    *(collect(engine.submit(p, params)) for p in prompts)
                )
                elapsed = time.perf_counter() - start
                rates[n] = sum(len(r.token_ids) for r in results) / elapsed
            return rates

        with phases("slmserve generation"):
            await collect(engine.submit(gen_workload(1, args, vocab)[0], params))  # warm-up
            gen = await generation()
        serial = {}
        if engine.overlaps:
            with phases("slmserve generation, overlap off"):
                # The loop reads the setting at every step; the engine is idle here.
                engine.config.overlap = "off"
                serial = await generation()
    return scoring, gen, serial


def load_hf(path: Path, args: argparse.Namespace) -> Any:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.to(args.device).eval()


async def hf_scoring(model: Any, args: argparse.Namespace, vocab: int, phases: Phases) -> Scoring:
    """transformers behind a dynamic batcher: each forward takes every waiting request (up to
    ``--hf-batch`` rows) as left-padded ``[query + item]`` rows, last position only."""
    queue: asyncio.Queue[tuple[Request, asyncio.Future[list[float]]]] = asyncio.Queue()

    def forward(rows: list[list[int]]) -> list[float]:
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, width - len(row) :] = torch.tensor(row)
            mask[r, width - len(row) :] = 1
        with torch.inference_mode():
            out = model(
                input_ids=ids.to(args.device),
                attention_mask=mask.to(args.device),
                logits_to_keep=1,
            )
            probs = torch.softmax(out.logits[:, -1, list(LABELS)].float(), dim=-1)
            return probs[:, 0].tolist()

    async def server() -> None:
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) * args.items < args.hf_batch:
                batch.append(queue.get_nowait())
            rows = [q + it for (q, items), _ in batch for it in items]
            scores = await asyncio.to_thread(forward, rows)
            for i, (_, fut) in enumerate(batch):
                fut.set_result(scores[i * args.items : (i + 1) * args.items])

    async def score(req: Request) -> list[float]:
        fut: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        await queue.put((req, fut))
        return await fut

    task = asyncio.create_task(server())
    try:
        return await measure_scoring("transformers", score, args, vocab, phases)
    finally:
        task.cancel()


def hf_generation(model: Any, args: argparse.Namespace, vocab: int) -> dict[int, float]:
    out = {}
    with torch.inference_mode():
        for n in [1, *args.concurrency]:  # the first, short run warms up
            ids = torch.tensor(gen_workload(n, args, vocab), device=args.device)
            new = args.output_tokens if n > 1 else min(8, args.output_tokens)
            sync(args.device)
            start = time.perf_counter()
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            sync(args.device)
            out[n] = (gen.shape[1] - ids.shape[1]) * n / (time.perf_counter() - start)
    return out


def run_hf(
    path: Path, args: argparse.Namespace, vocab: int, phases: Phases
) -> tuple[Scoring, dict[int, float]]:
    """transformers: one model load for scoring, then generation."""
    with phases("transformers load"):
        model = load_hf(path, args)
    scoring = asyncio.run(hf_scoring(model, args, vocab, phases))
    with phases("transformers generation"):
        gen = hf_generation(model, args, vocab)
    del model
    return scoring, gen


# ------------------------------------------------------------------------------ main


def run_model(name: str, shape: dict[str, Any], args: argparse.Namespace, rate: float) -> dict:
    vocab = shape["vocab_size"]
    phases, begin = Phases(), time.perf_counter()
    print(f"\n== {name}: scoring (P99 bound {P99_BOUND * 1e3:.0f} ms), then generation",
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        with phases("build model"):
            build_model(path, shape, args.device, args.seed)
        ours, gen_ours, gen_serial = asyncio.run(run_engine(path, args, vocab, phases))
        release(args.device)
        theirs, gen_theirs = run_hf(path, args, vocab, phases)
        release(args.device)
    print(f"  [{time.perf_counter() - begin:6.1f} s] {name} in all", flush=True)
    diff = max(
        (abs(a - b) for x, y in zip(ours.warmup_scores, theirs.warmup_scores)
         for a, b in zip(x, y)),
        default=float("nan"),
    )  # fmt: skip
    return {
        "name": name,
        "ours": ours,
        "theirs": theirs,
        "ceiling": rate / item_flops(shape, args.item_tokens, args.query_tokens),
        "gen_ours": gen_ours,
        "gen_serial": gen_serial,
        "gen_theirs": gen_theirs,
        "diff": diff,
    }


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def print_table(results: list[dict], args: argparse.Namespace, rate: float) -> None:
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n## {device}, {args.dtype}, matmul {rate / 1e12:.2f} TFLOP/s measured")
    print(
        f"scoring: {args.items} items x {args.item_tokens} tokens per request, "
        f"{args.query_tokens}-token shared query; items/s at P99 < {P99_BOUND * 1e3:.0f} ms "
        f"(Poisson load at {', '.join(f'{f:g}' for f in args.fractions)} x burst capacity, "
        f"{args.duration:g} s each); burst = closed-loop capacity; max dp = largest "
        "label-probability difference on the warm-up requests\n"
    )
    print(
        "| model | slmserve items/s | transformers items/s | ratio | slmserve burst "
        "| transformers burst | ceiling items/s | MFU | max dp |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ours, theirs = r["ours"], r["theirs"]
        print(
            f"| {r['name']} | {ours.best:.0f} | {theirs.best:.0f} | "
            f"{ratio(ours.best, theirs.best)} | {ours.capacity:.0f} | {theirs.capacity:.0f} | "
            f"{r['ceiling']:.0f} | {ours.best / r['ceiling']:.0%} | {r['diff']:.4f} |"
        )
    print("\ngeneration: output tokens/s (greedy, "
          f"{args.prompt_tokens}-token prompts, {args.output_tokens} output tokens); "
          "overlap off: the same engine, one step at a time\n")  # fmt: skip
    print("| model | concurrent | slmserve tok/s | transformers tok/s | ratio "
          "| slmserve overlap off | on / off |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for n in args.concurrency:
            ours, theirs = r["gen_ours"][n], r["gen_theirs"][n]
            serial = r["gen_serial"].get(n)
            off = ("-", "-") if serial is None else (f"{serial:.0f}", ratio(ours, serial))
            print(f"| {r['name']} | {n} | {ours:.0f} | {theirs:.0f} | {ratio(ours, theirs)} "
                  f"| {off[0]} | {off[1]} |")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--items", type=int, default=10, help="items per scoring request")
    ap.add_argument("--item-tokens", type=int, default=300)
    ap.add_argument("--query-tokens", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=16, help="scoring warm-up requests")
    ap.add_argument("--probe-start", type=int, default=16, help="first burst, requests")
    ap.add_argument("--probe-seconds", type=float, default=2.5, help="shortest measured burst")
    ap.add_argument("--probe-max", type=int, default=4096, help="largest burst, requests")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.7, 0.85, 1.0],
                    help="offered loads, as fractions of the burst capacity")  # fmt: skip
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of arrivals per level")
    ap.add_argument("--min-requests", type=int, default=20, help="fewest requests per level")
    ap.add_argument("--hf-batch", type=int, default=128, help="baseline rows per forward")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--kv-tokens", type=int, default=300_000)
    ap.add_argument("--max-batch-tokens", type=int, default=16_384)
    ap.add_argument("--no-cuda-graphs", action="store_true", help="eager decode steps")
    ap.add_argument(
        "--attention", choices=["auto", "triton", "torch"], default="auto",
        help="the engine's attention path (torch: SDPA and unfused ops, no Triton kernels)",
    )  # fmt: skip
    ap.add_argument(
        "--overlap", choices=["auto", "on", "off"], default="auto",
        help="overlapped steps (EngineConfig.overlap; auto = on for CUDA)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.device, args.dtype = "cuda", "bfloat16"
    if args.smoke:
        args.device, args.dtype = "cpu", "float32"
        args.items, args.item_tokens, args.query_tokens = 3, 12, 8
        args.warmup, args.probe_start, args.probe_seconds = 2, 4, 0.2
        args.duration, args.min_requests = 0.3, 4
        args.hf_batch, args.concurrency = 16, [2, 4]
        args.prompt_tokens, args.output_tokens = 8, 4
        args.kv_tokens, args.max_batch_tokens = 4096, 512
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or use --smoke for the CPU check")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    begin = time.perf_counter()
    rate = matmul_rate(args.device, getattr(torch, args.dtype))
    print(f"matmul rate {rate / 1e12:.2f} TFLOP/s ({time.perf_counter() - begin:.1f} s)")
    models = {"smoke": SMOKE} if args.smoke else {m: MODELS[m] for m in args.models}
    results = []
    for i, (name, shape) in enumerate(models.items()):
        results.append(run_model(name, shape, args, rate))
        if i + 1 < len(models):
            print_table(results, args, rate)  # figures so far, in case the run is cut short
    print_table(results, args, rate)
    print(f"\nwall time {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
