"""Generation throughput: the engine vs transformers' static batching, plus engine overhead.

Part 1 (model): 256 requests — prompts of 32–512 tokens where every prompt longer than 256
tokens starts with one of 8 shared 256-token system prompts, outputs of 16–256 tokens — on a
~12M-parameter Qwen3 shape (hidden 384, 6 layers, 6 heads, 2 KV heads, head_dim 64,
intermediate 1024, vocab 8192), CPU fp32, random weights. Baseline: ``transformers``
``generate`` in static, left-padded batches of 32, greedy, each batch running to its longest
output. Both produce the same requested output tokens; the script checks the greedy outputs
agree and prints output tokens/s of both and the ratio.

Part 2 (overhead): the same engine with the ``null`` backend (no model; constant-time logits)
at 256 concurrent requests: output tokens/s is the ceiling the Python engine itself imposes.
The per-step breakdown (schedule, batch build, forward, sample, output) and the longest step
are printed.

    python benchmarks/generation.py                 # full run (several minutes on 2 cores)
    python benchmarks/generation.py --requests 64   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import tempfile
import time
from pathlib import Path

import torch

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect

VOCAB = 8192
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    # A wider init than the default makes greedy choices decisive (random weights otherwise
    # give near-uniform logits, where any float reordering flips an argmax).
    "initializer_range": 0.1,
    "eos_token_id": 0,
    "pad_token_id": 0,
}


def write_word_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer with ``vocab`` entries, so every token id decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def build_model(path: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**SHAPE), dtype=torch.float32)
    model.save_pretrained(path)
    write_word_tokenizer(path, VOCAB)


def workload(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(1, VOCAB) for _ in range(256)] for _ in range(8)]
    prompts, outputs = [], []
    for _ in range(n):
        length = rng.randint(32, 512)
        if length > 256:
            prompt = rng.choice(systems) + [rng.randrange(1, VOCAB) for _ in range(length - 256)]
        else:
            prompt = [rng.randrange(1, VOCAB) for _ in range(length)]
        prompts.append(prompt)
        outputs.append(rng.randint(16, 256))
    return prompts, outputs


def run_hf(
    path: Path, prompts: list[list[int]], outputs: list[int], batch: int
) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(prompts), batch):
            idx = list(range(b, min(b + batch, len(prompts))))
            width = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):  # left padding
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            gen = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(outputs[i] for i in idx),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            for row, i in enumerate(idx):
                results[i] = gen[row, width : width + outputs[i]].tolist()
    return time.perf_counter() - start, results


async def run_engine(
    engine: Engine, prompts: list[list[int]], outputs: list[int]
) -> tuple[float, list[list[int]]]:
    async with engine:
        start = time.perf_counter()
        streams = [
            engine.submit(p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
            for p, m in zip(prompts, outputs)
        ]
        results = await asyncio.gather(*(collect(s) for s in streams))
        elapsed = time.perf_counter() - start
    return elapsed, [r.token_ids for r in results]


def breakdown(engine: Engine, elapsed: float) -> str:
    t = engine.times
    parts = ["schedule", "batch", "forward", "sample", "output"]
    per_step = "  ".join(f"{p} {1e3 * getattr(t, p) / max(t.steps, 1):.2f} ms" for p in parts)
    return (
        f"    steps {t.steps}, {elapsed / max(t.steps, 1) * 1e3:.2f} ms/step wall\n"
        f"    per step: {per_step}\n"
        f"    longest step {t.max_step * 1e3:.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="baseline static batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts, outputs = workload(args.requests, args.seed)
    total_out = sum(outputs)
    n_prompt = sum(map(len, prompts))
    print(f"workload: {len(prompts)} requests, {n_prompt} prompt tokens, {total_out} output tokens")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen3-12m"
        build_model(path, args.seed)
        cfg = EngineConfig(
            model=str(path),
            device="cpu",
            dtype="float32",
            kv_tokens=65536,
            max_batch_tokens=2048,
            chunked_prefill_size=512,
            max_running_requests=256,
        )
        engine = Engine(cfg)
        t_engine, got = asyncio.run(run_engine(engine, prompts, outputs))
        print(
            f"slmserve engine: {t_engine:.1f} s, {total_out / t_engine:.0f} output tok/s, "
            f"prefix hits {engine.core.prefix_hits}/{engine.core.prefix_queries} tokens"
        )
        print(breakdown(engine, t_engine))
        if not args.skip_baseline:
            gc.collect()
            t_hf, want = run_hf(path, prompts, outputs, args.batch)
            same = sum(g == w for g, w in zip(got, want))
            print(
                f"transformers generate (static batches of {args.batch}): {t_hf:.1f} s, "
                f"{total_out / t_hf:.0f} output tok/s"
            )
            print(f"ratio engine / baseline: {t_hf / t_engine:.2f}x   (target >= 2.5x)")
            print(f"identical greedy outputs: {same}/{len(prompts)} requests")

        # The overhead run measures Python, not arithmetic: one torch thread, so OpenMP's
        # thread pool does not fight the event loop for the cores over tiny tensors.
        torch.set_num_threads(1)
        null = Engine(
            EngineConfig(
                model=None,
                backend="null",
                kv_tokens=1 << 20,
                max_running_requests=256,
                max_batch_tokens=8192,
                chunked_prefill_size=8192,
            )
        )
        short = [p[:64] for p in prompts[:256]]
        t_null, _ = asyncio.run(
            run_engine(null, [[t % 250 + 3 for t in p] for p in short], [256] * len(short))
        )
        toks = 256 * len(short)
        print(
            f"engine overhead (null backend, {len(short)} concurrent): "
            f"{toks / t_null:.0f} output tok/s (target >= 50,000)"
        )
        print(breakdown(null, t_null))


if __name__ == "__main__":
    main()
