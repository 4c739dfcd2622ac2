"""Relevance-scoring throughput: the engine's shared-prefix path vs two transformers baselines.

Model: the generation benchmark's ~12M-parameter Qwen3 shape (hidden 384, 6 layers, 6 heads,
2 KV heads, head_dim 64, intermediate 1024, vocab 8192), CPU fp32, random weights, with a word
tokenizer that also knows ``.`` (so the extractive compressor finds sentences).

Cases: one query of 200 tokens scored against 64 items of 100 tokens, and against 64 items of
100–500 tokens. Each request uses a fresh query and fresh items (nothing is cached across
requests); each system scores the same requests, taking turns request by request (after one
warm-up request each) so that load drift on a shared machine hits all systems alike:

* **slmserve**: ``AsyncEngine.score`` — the query prefix is computed once through the radix
  cache, the items run as ragged prefill chunks, only the two label rows of the LM head are read.
* **(a) transformers, padded**: ``[query + item]`` batches (left-padded), last position's logits
  only (``logits_to_keep=1``).
* **(b) transformers, shared KV**: the query's KV computed once, repeated over each batch of
  items (right-padded after it); the label logits are read at each item's last real position.

Scores are checked against baseline (a) (max abs difference printed). The compute ceiling
counts the FLOPs of the non-shared tokens (2·params per token through the layers plus the
attention over the query and the item) at the matmul rate this machine measured in the same
run. A last section scores text items with and without the ``extractive`` compressor at a 4×
shorter budget (25 of 100 tokens) and reports the additional gain.

    python benchmarks/scoring.py              # 6 requests per case (a few minutes)
    python benchmarks/scoring.py --requests 2 # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generation import SHAPE, VOCAB, build_model

from slmserve import Engine, EngineConfig
from slmserve.plugins import PluginManager

QUERY_TOKENS = 200
ITEMS = 64
LABELS = (1, 2)
DOT = VOCAB - 1  # the id the tokenizer gives to "."

Request = tuple[list[int], list[list[int]]]


def write_sentence_tokenizer(path: Path) -> None:
    """Words ``w1``..``w8190`` plus ``.`` (id 8191): token ids and text map one to one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, DOT)}, ".": DOT}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def make_requests(n: int, lengths: Callable[[random.Random], int], seed: int) -> list[Request]:
    """Fresh query and items per request; items are sentences of 10 tokens ending in ".",
    a few of which reuse the query's words (so an extractive compressor has something to find)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        query = [rng.randrange(3, DOT) for _ in range(QUERY_TOKENS)]
        items = []
        for _ in range(ITEMS):
            length, item = lengths(rng), []
            while len(item) < length:
                pool = query if rng.random() < 0.2 else None
                words = [rng.choice(pool) if pool else rng.randrange(3, DOT) for _ in range(9)]
                item += [*words, DOT]
            items.append(item[:length])
        out.append((query, items))
    return out


# ------------------------------------------------------------------------------ baselines


def label_probs(logits: torch.Tensor) -> list[float]:
    return torch.softmax(logits[:, list(LABELS)].float(), dim=-1)[:, 0].tolist()


def hf_padded(model: torch.nn.Module, req: Request, batch: int) -> list[float]:
    query, items = req
    scores: list[float] = []
    for b in range(0, len(items), batch):
        rows = [query + it for it in items[b : b + batch]]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):  # left padding: every row's last token is at the end
            ids[r, width - len(row) :] = torch.tensor(row)
            mask[r, width - len(row) :] = 1
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        scores += label_probs(out.logits[:, -1])
    return scores


def hf_shared_kv(model: torch.nn.Module, req: Request, batch: int) -> list[float]:
    query, items = req
    prefix = model(input_ids=torch.tensor([query]), use_cache=True).past_key_values
    scores: list[float] = []
    for b in range(0, len(items), batch):
        chunk = items[b : b + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), len(query) + width, dtype=torch.long)
        mask[:, : len(query)] = 1
        for r, it in enumerate(chunk):  # right padding after the shared prefix
            ids[r, : len(it)] = torch.tensor(it)
            mask[r, len(query) : len(query) + len(it)] = 1
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(chunk))
        hidden = model.model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        last = torch.tensor([len(it) - 1 for it in chunk])
        rows = hidden.last_hidden_state[torch.arange(len(chunk)), last]
        scores += label_probs(model.lm_head(rows))
    return scores


Scorer = Callable[[Request], Awaitable[tuple[list[float], int]]]
"""Scores one request; returns the label-0 probabilities and the item tokens it computed."""


def hf_scorer(fn: Callable[[Request], list[float]]) -> Scorer:
    async def score(req: Request) -> tuple[list[float], int]:
        with torch.inference_mode():
            return fn(req), sum(map(len, req[1]))

    return score


def engine_scorer(engine: Engine, compress: Callable | None = None) -> Scorer:
    async def score(req: Request) -> tuple[list[float], int]:
        query, items = req
        if compress is not None:
            items = await asyncio.to_thread(compress, query, items)
        result = await engine.score(query, items, label_token_ids=LABELS)
        return [s[0] for s in result.scores], result.prompt_tokens - result.cached_tokens

    return score


async def compare(scorers: dict[str, Scorer], reqs: list) -> dict[str, tuple[float, list, int]]:
    """Seconds, scores and item tokens per system. Request by request, the systems take turns
    (in rotating order), so drift in a shared machine's load hits all of them alike. Each
    request has a fresh query, so the engine's cache never serves one request from another."""
    for score in scorers.values():
        await score(reqs[0])  # warm-up
    totals = {name: [0.0, [], 0] for name in scorers}
    names = list(scorers)
    for i, req in enumerate(reqs[1:]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            scores, tokens = await scorers[name](req)
            totals[name][0] += time.perf_counter() - start
            totals[name][1].append(scores)
            totals[name][2] += tokens
    return {name: (t, sc, tok) for name, (t, sc, tok) in totals.items()}


def new_engine(path: Path) -> Engine:
    return Engine(
        EngineConfig(
            model=str(path),
            device="cpu",
            dtype="float32",
            kv_tokens=65536,
            max_batch_tokens=4096,
            chunked_prefill_size=4096,
            max_running_requests=256,
            max_waiting_requests=4096,
        )
    )


# ------------------------------------------------------------------------------ ceiling


def matmul_rate() -> float:
    """FLOP/s of a large fp32 matmul on this machine (best of 5)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def item_flops(item_len: float) -> float:
    """FLOPs of one item's tokens: weights (2 per parameter) + attention over query + item."""
    h, layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    heads, kv, d = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]
    inter = SHAPE["intermediate_size"]
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter
    mean_context = QUERY_TOKENS + (item_len + 1) / 2
    attention = 4 * layers * heads * d * mean_context
    return item_len * (2 * layers * per_layer + attention)


# ------------------------------------------------------------------------------ main


def run_case(name: str, path: Path, reqs: list[Request], batch: int, rate: float) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    async def go() -> dict[str, tuple[float, list, int]]:
        async with new_engine(path) as engine:
            scorers = {
                "engine": engine_scorer(engine),
                "a": hf_scorer(lambda r: hf_padded(model, r, batch)),
                "b": hf_scorer(lambda r: hf_shared_kv(model, r, batch)),
            }
            return await compare(scorers, reqs)

    res = asyncio.run(go())
    n_items = (len(reqs) - 1) * ITEMS
    mean_len = sum(len(it) for _, items in reqs[1:] for it in items) / n_items
    (t_ours, ours, _), (t_a, want, _), (t_b, shared, _) = res["engine"], res["a"], res["b"]
    diff = max(abs(x - y) for o, w in zip(ours, want) for x, y in zip(o, w))
    diff_b = max(abs(x - y) for o, w in zip(shared, want) for x, y in zip(o, w))
    ceiling = rate / item_flops(mean_len)
    print(f"\n== {name}: {len(reqs) - 1} requests x {ITEMS} items, mean item {mean_len:.0f} tokens")
    print(f"  slmserve engine          {n_items / t_ours:8.1f} items/s")
    print(f"  (a) transformers padded  {n_items / t_a:8.1f} items/s   (batch {batch})")
    print(f"  (b) transformers shared  {n_items / t_b:8.1f} items/s   (batch {batch})")
    print(f"  ratio vs (a): {t_a / t_ours:.2f}x (target >= 2x)   vs (b): {t_b / t_ours:.2f}x")
    print(f"  compute ceiling {ceiling:.0f} items/s -> engine at {n_items / t_ours / ceiling:.0%}")
    print(f"  max |score - (a)|: engine {diff:.1e}, (b) {diff_b:.1e}")


def run_compressed(path: Path, reqs: list[Request]) -> None:
    """Text items, scored plain and through ``extractive`` at a quarter of their tokens."""

    def text(ids: list[int]) -> str:
        return " ".join("." if t == DOT else f"w{t}" for t in ids)

    texts = [(text(q), [text(it) for it in items]) for q, items in reqs]
    extractive = PluginManager().compressors.get("extractive")(max_tokens=25)

    async def go() -> dict[str, tuple[float, list, int]]:
        async with new_engine(path) as engine:

            def compress(query: str, items: list[str]) -> list[str]:
                tok = engine.tokenizer
                return [extractive.compress(it, query=query, tokenizer=tok) for it in items]

            scorers = {"plain": engine_scorer(engine), "short": engine_scorer(engine, compress)}
            return await compare(scorers, texts)

    res = asyncio.run(go())
    (t_plain, _, tok_plain), (t_short, _, tok_short) = res["plain"], res["short"]
    n = (len(reqs) - 1) * ITEMS
    print("\n== extractive compressor, 100-token items cut to <= 25 tokens (text in, timed)")
    print(f"  plain       {n / t_plain:8.1f} items/s, {tok_plain / n:.0f} item tokens")
    print(f"  extractive  {n / t_short:8.1f} items/s, {tok_short / n:.0f} item tokens")
    print(f"  gain {t_plain / t_short:.2f}x, compression {tok_plain / max(tok_short, 1):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=6, help="requests per case (+1 warm-up)")
    ap.add_argument("--batch", type=int, default=16, help="baseline batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen3-12m"
        build_model(path, args.seed)
        write_sentence_tokenizer(path)
        fixed = make_requests(args.requests + 1, lambda r: 100, args.seed)
        mixed = make_requests(args.requests + 1, lambda r: r.randint(100, 500), args.seed + 1)
        run_case("100-token items", path, fixed, args.batch, rate)
        run_case("100-500-token items", path, mixed, args.batch, rate)
        run_compressed(path, fixed)


if __name__ == "__main__":
    main()
