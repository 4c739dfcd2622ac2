"""OSSCAR against its baselines on a model trained here, on CPU, from local text.

No weights or datasets can be downloaded, and random weights make perplexity meaningless, so
this script first trains a small Qwen3-shaped model (~4.2M parameters: vocab 4096, hidden 256,
4 layers, 8 query / 4 KV heads of 32, MLP 768, tied embeddings) on the Python standard
library's own source files with a byte-level BPE tokenizer trained by ``tokenizers``. Files
are split deterministically by a hash of their path into train (90%), calibration (5%) and
held-out (5%) parts. The trained model is cached under ``benchmarks/out/pruning/`` (ignored by
git), so a re-run skips training.

Then, for 25%, 40% and 50% of the MLP neurons removed (and once 40% plus half the KV groups),
every method prunes a fresh copy with the same 512 calibration windows of 128 tokens:
``magnitude``, ``magnitude-refit``, ``wanda``, ``osscar`` (greedy) and ``osscar`` + local
search. Reported per run: held-out perplexity on 512 windows (65K tokens), its paired
difference to magnitude + refit with a standard error over windows, mean per-layer relative
reconstruction error on 128 held-out windows (MLP and attention separately) and the parameter
count. Then a short retraining of the 40% MLP + half-KV OSSCAR+LS model (and, for fairness,
the same number of extra steps for the dense model; cached), and the engine's generation
throughput for the dense and the packed pruned models on the same requests in the same run.

    nice -n 10 python benchmarks/pruning.py  # ~6 min with the dense model cached; +23 to train
    nice -n 10 python benchmarks/pruning.py --train-steps 100 --retrain-steps 0 --skip-throughput

Writes ``results.json`` and ``results.md`` next to the cached model.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import math
import random
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect
from slmserve.prune.calibration import GramCollector, Windows, make_windows
from slmserve.prune.gram import relative_error
from slmserve.prune.pack import count_parameters, pack_model, save_packed
from slmserve.prune.pipeline import PruneOptions, PruneResult, plan_budgets, prune_model

OUT = Path(__file__).parent / "out" / "pruning"
EOS = "<|endoftext|>"
SHAPE: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "rope_theta": 10_000.0,
}
METHODS: list[tuple[str, str, bool]] = [
    ("magnitude", "magnitude", False),
    ("magnitude-refit", "magnitude-refit", False),
    ("wanda", "wanda", False),
    ("osscar", "osscar", False),
    ("osscar+ls", "osscar", True),
]


# ------------------------------------------------------------------------------ data


def split_files() -> dict[str, list[Path]]:
    """Standard-library ``.py`` files (no site-packages) split by a hash of the relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[Path]] = {"train": [], "calib": [], "heldout": []}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if {"site-packages", "dist-packages"} & set(rel.parts):
            continue
        bucket = int(hashlib.sha1(str(rel).encode()).hexdigest(), 16) % 20
        parts["heldout" if bucket == 0 else "calib" if bucket == 1 else "train"].append(f)
    return parts


def read_texts(files: list[Path], limit_bytes: int) -> list[str]:
    texts, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def train_tokenizer(texts: list[str], vocab: int, path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.model_max_length = SHAPE["max_position_embeddings"]
    fast.save_pretrained(path)
    return fast


def encode(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------ training


def train(
    model: nn.Module, stream: torch.Tensor, steps: int, batch: int, seq: int, lr: float, seed: int
) -> list[float]:
    """AdamW, linear warm-up then cosine decay to 10%; random windows of the token stream."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        x = torch.stack([stream[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(
                f"  step {step + 1}/{steps}  loss {recent:.3f}  {time.perf_counter() - start:.0f} s"
            )
    model.eval()
    return losses


def dense_model(args: argparse.Namespace, tokenizer_dir: Path, stream: torch.Tensor) -> Path:
    """Train (or reuse the cached) dense model; returns its checkpoint directory."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    key = json.dumps([SHAPE, args.train_steps, args.batch, args.seq_len, args.lr, args.seed])
    path = OUT / f"dense-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (path / "model.safetensors").is_file():
        print(f"dense model: cached in {path}")
        return path
    torch.manual_seed(args.seed)
    cfg = Qwen3Config(**SHAPE, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    print(f"training the dense model ({count_parameters(model):,} parameters) ...")
    start = time.perf_counter()
    train(model, stream, args.train_steps, args.batch, args.seq_len, args.lr, args.seed)
    print(f"  trained in {time.perf_counter() - start:.0f} s")
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, windows: Windows, result: PruneResult | None, error_windows: int = 0
) -> dict[str, Any]:
    """Held-out perplexity, per-window NLL sums and, for a pruned model, mean relative errors.

    Errors use the same definition as during pruning (dense weights applied to the pruned
    model's own inputs), measured on the first ``error_windows`` held-out windows (all if 0)
    instead of the calibration ones: their float64 Gram matrices cost about as much as the
    forward pass, and the error needs fewer tokens than a perplexity difference of 0.1%.
    """
    model.eval()
    hooks: list[tuple[GramCollector, GramCollector]] = []
    if result is not None:
        for layer in model.model.layers:
            pair = (GramCollector(layer.self_attn.o_proj), GramCollector(layer.mlp.down_proj))
            hooks.append(pair)
    limit = error_windows or len(windows.ids)
    window_nll: list[float] = []
    count, seen = 0, 0
    for b in windows.batches(16):
        rows = torch.arange(seen, seen + len(b.ids)) < limit
        seen += len(b.ids)
        for pair in hooks:
            for c in pair:
                c.mask = b.mask & rows[:, None]
        logits = model(input_ids=b.ids, attention_mask=b.mask.long()).logits[:, :-1]
        target = b.ids[:, 1:]
        keep = b.mask[:, 1:]
        losses = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view(target.shape)
        window_nll += (losses * keep).sum(1).tolist()
        count += int(keep.sum())
    out: dict[str, Any] = {"ppl": math.exp(sum(window_nll) / count), "window_nll": window_nll}
    out["tokens"] = count
    if result is not None:
        attn, mlp = [], []
        for layer, res, (co, cd) in zip(model.model.layers, result.layers, hooks):
            gram_o, gram_d = co.close(), cd.close()
            if len(res.kv_kept) < res.kv_total:
                attn.append(relative_error(gram_o, res.dense_o, layer.self_attn.o_proj.weight))
            if len(res.mlp_kept) < res.mlp_total:
                mlp.append(relative_error(gram_d, res.dense_down, layer.mlp.down_proj.weight))
        out["mlp_err"] = sum(mlp) / len(mlp) if mlp else 0.0
        out["attn_err"] = sum(attn) / len(attn) if attn else float("nan")
        out["calib_mlp_err"] = sum(r.mlp_error for r in result.layers) / len(result.layers)
    return out


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """``ppl_a / ppl_b − 1`` and its standard error, from per-window NLL differences.

    Both models read the same held-out windows, so the comparison is paired: the windows'
    NLL differences vary far less than the NLLs themselves. Windows are treated as independent
    samples (they are disjoint, evenly spread stretches of held-out files).
    """
    diff = torch.tensor(a["window_nll"], dtype=torch.float64) - torch.tensor(
        b["window_nll"], dtype=torch.float64
    )
    tokens = a["tokens"]
    mean = float(diff.sum()) / tokens
    se = float(diff.std()) * math.sqrt(len(diff)) / tokens if len(diff) > 1 else float("nan")
    return math.expm1(mean), se


# ------------------------------------------------------------------------------ throughput


async def engine_run(path: Path, prompts: list[list[int]], max_new: int) -> float:
    cfg = EngineConfig(
        model=str(path), device="cpu", dtype="float32", kv_tokens=32768, max_running_requests=64
    )
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    async with Engine(cfg) as engine:
        start = time.perf_counter()
        await asyncio.gather(*(collect(engine.submit(p, params)) for p in prompts))
        elapsed = time.perf_counter() - start
    return len(prompts) * max_new / elapsed


def throughput(models: dict[str, Path], stream: torch.Tensor, n: int, rounds: int) -> dict:
    """Output tokens/s per model on identical requests, rounds interleaved; best round kept."""
    rng = random.Random(0)
    prompts = []
    for _ in range(n):
        length = rng.randint(64, 192)
        s = rng.randrange(0, len(stream) - length)
        prompts.append(stream[s : s + length].tolist())
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, path in models.items():
            tps = asyncio.run(engine_run(path, prompts, 64))
            best[name] = max(best.get(name, 0.0), tps)
    return best


# ------------------------------------------------------------------------------ main


def run_pruning(
    dense: nn.Module,
    calib: Windows,
    heldout: Windows,
    error_windows: int,
    mlp_keep: float,
    kv_keep: float,
    method: tuple[str, str, bool],
) -> tuple[nn.Module, PruneResult, dict[str, Any]]:
    name, algo, local = method
    model = copy.deepcopy(dense)
    budgets = plan_budgets(model, mlp_keep, kv_keep)
    start = time.perf_counter()
    result = prune_model(model, calib, budgets, PruneOptions(algo, local_search=local))
    seconds = time.perf_counter() - start
    row = {"method": name, "mlp_removed": round(1 - mlp_keep, 2), "kv_keep": kv_keep}
    row |= evaluate(model, heldout, result, error_windows)
    packed = copy.deepcopy(model)
    pack_model(packed, result, {"method": name})
    row["params"] = count_parameters(packed)
    row["prune_s"] = round(seconds, 1)
    row["eval_s"] = round(time.perf_counter() - start - seconds, 1)
    return model, result, row


def markdown(results: dict[str, Any]) -> str:
    dense = results["dense"]
    lines = [
        f"Dense: {dense['params']:,} parameters, held-out perplexity {dense['ppl']:.3f} "
        f"({dense['tokens']:,} tokens).",
        "",
        "| MLP removed | KV groups kept | method | params | held-out ppl | vs dense "
        "| vs magnitude-refit (± 1 s.e.) | MLP rel. err | attn rel. err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        attn = "–" if math.isnan(r["attn_err"]) else f"{r['attn_err']:.4f}"
        vs = "–" if r["method"] == "magnitude-refit" else f"{r['vs_mp']:+.2%} ± {r['vs_mp_se']:.2%}"
        lines.append(
            f"| {r['mlp_removed']:.0%} | {r['kv_keep']:.0%} | {r['method']} | {r['params']:,} "
            f"| {r['ppl']:.3f} | {r['ppl'] / dense['ppl'] - 1:+.1%} | {vs} "
            f"| {r['mlp_err']:.4f} | {attn} |"
        )
    if results.get("retrain"):
        rt = results["retrain"]
        lines += [
            "",
            f"Retraining {rt['steps']} steps: OSSCAR+LS 40% MLP, half the KV groups "
            f"{rt['pruned_before']:.3f} -> {rt['pruned_after']:.3f}; dense with the same extra "
            f"steps {rt['dense_before']:.3f} -> {rt['dense_after']:.3f} "
            f"(pruned/dense {rt['pruned_after'] / rt['dense_after'] - 1:+.1%}).",
        ]
    if results.get("throughput"):
        tp = results["throughput"]
        base = tp["dense"]
        lines += ["", "| model | output tok/s | vs dense |", "|---|---|---|"]
        lines += [f"| {k} | {v:.0f} | {v / base:.2f}x |" for k, v in tp.items()]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in results["phases"].items())
    lines += ["", f"Wall time {results['seconds']} s ({phases})."]
    return "\n".join(lines)


def retrain(
    args: argparse.Namespace,
    dense_dir: Path,
    dense: nn.Module,
    stream: torch.Tensor,
    heldout: Windows,
) -> dict[str, Any]:
    """A short retraining of the 40% MLP + half-KV OSSCAR+LS model, and of the dense model.

    The dense model gets the same extra steps so that the effect of re-warming the learning rate
    is not credited to (or blamed on) pruning. Its result depends only on the dense model and
    the retraining settings, so it is cached next to the dense checkpoint.
    """
    from transformers import AutoModelForCausalLM

    steps, lr = args.retrain_steps, args.lr / 3
    rt: dict[str, Any] = {"steps": steps}
    pruned = AutoModelForCausalLM.from_pretrained(OUT / "pruned-mlp40-kv0.5").eval()
    rt["pruned_before"] = evaluate(pruned, heldout, None)["ppl"]
    train(pruned, stream, steps, args.batch, args.seq_len, lr, 1)
    rt["pruned_after"] = evaluate(pruned, heldout, None)["ppl"]
    cache = dense_dir / f"retrained-{steps}-{lr:g}-{len(heldout.ids)}.json"
    if cache.is_file():
        rt |= json.loads(cache.read_text())
    else:
        extra = copy.deepcopy(dense)
        control = {"dense_before": evaluate(extra, heldout, None)["ppl"]}
        train(extra, stream, steps, args.batch, args.seq_len, lr, 1)
        control["dense_after"] = evaluate(extra, heldout, None)["ppl"]
        cache.write_text(json.dumps(control) + "\n")
        rt |= control
    return rt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=512)
    ap.add_argument(
        "--error-windows", type=int, default=128, help="held-out windows for the errors (0: all)"
    )
    ap.add_argument("--retrain-steps", type=int, default=100)
    ap.add_argument("--throughput-requests", type=int, default=64)
    ap.add_argument("--throughput-rounds", type=int, default=2)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - since
        return now

    files = split_files()
    print("files: " + ", ".join(f"{k} {len(v)}" for k, v in files.items()))
    tok_dir = OUT / "tokenizer-4096"
    if (tok_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(read_texts(files["train"], 6_000_000), 4096, tok_dir)
    need = args.train_steps * args.batch * args.seq_len * 4  # bytes, roughly 1 token per 4
    train_stream = encode(tokenizer, read_texts(files["train"], max(need, 2_000_000)))
    calib_stream = encode(tokenizer, read_texts(files["calib"], 10**9))
    held_stream = encode(tokenizer, read_texts(files["heldout"], 10**9))
    print(
        f"tokens: train {len(train_stream):,}, calibration {len(calib_stream):,}, "
        f"held-out {len(held_stream):,}"
    )
    calib = make_windows(calib_stream.tolist(), args.calib_samples, args.seq_len)
    heldout = make_windows(held_stream.tolist(), args.eval_windows, args.seq_len)
    t = lap("data", t0)

    dense_dir = dense_model(args, tok_dir, train_stream)
    t = lap("training (0 if cached)", t)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    dense_eval = evaluate(dense, heldout, None)
    results: dict[str, Any] = {
        "config": vars(args) | {"shape": SHAPE, "calib_tokens": calib.num_tokens},
        "dense": {"params": count_parameters(dense), **dense_eval},
        "runs": [],
    }
    print(f"dense: held-out ppl {results['dense']['ppl']:.3f} ({dense_eval['tokens']:,} tokens)")

    for mlp_keep, kv_keep in [(0.75, 1.0), (0.6, 1.0), (0.5, 1.0), (0.6, 0.5)]:
        rows = {}
        for method in METHODS:
            model, result, row = run_pruning(
                dense, calib, heldout, args.error_windows, mlp_keep, kv_keep, method
            )
            rows[method[0]] = row
            results["runs"].append(row)
            print(
                f"  MLP -{row['mlp_removed']:.0%} KV x{kv_keep:g} {method[0]:<16} "
                f"ppl {row['ppl']:8.3f}  MLP err {row['mlp_err']:.4f}  "
                f"attn err {row['attn_err']:.4f}  params {row['params']:,}  "
                f"(prune {row['prune_s']} s, eval {row['eval_s']} s)"
            )
            if method[0] == "osscar+ls" and mlp_keep == 0.6:
                pack_model(model, result, {"method": method[0]})
                target = OUT / f"pruned-mlp40-kv{kv_keep:g}"
                if target.exists():
                    for f in target.iterdir():
                        f.unlink()
                save_packed(model, target, dense_dir)
        for row in rows.values():
            row["vs_mp"], row["vs_mp_se"] = paired(row, rows["magnitude-refit"])
        t = lap("pruning and evaluation", t)
    for row in [results["dense"], *results["runs"]]:
        del row["window_nll"]

    if args.retrain_steps:
        print(f"retraining {args.retrain_steps} steps (pruned 40% MLP + half KV, and dense) ...")
        results["retrain"] = retrain(args, dense_dir, dense, train_stream, heldout)
        t = lap("retraining", t)

    if not args.skip_throughput:
        print("engine throughput (same requests, rounds interleaved) ...")
        results["throughput"] = throughput(
            {
                "dense": dense_dir,
                "pruned MLP -40%": OUT / "pruned-mlp40-kv1",
                "pruned MLP -40%, KV x0.5": OUT / "pruned-mlp40-kv0.5",
            },
            held_stream,
            args.throughput_requests,
            args.throughput_rounds,
        )
        t = lap("throughput", t)
    results["seconds"] = round(time.perf_counter() - t0)
    results["phases"] = {k: round(v) for k, v in phases.items()}
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (OUT / "results.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\ntotal {results['seconds']} s; results in {OUT}")


if __name__ == "__main__":
    main()
