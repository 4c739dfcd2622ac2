"""Where a scoring step's GPU time goes: every op of a Qwen3-0.6B layer, timed on its own.

The step is the GPU benchmark's scoring shape at its batch budget: 50 items of 300 new tokens,
each over a cached 200-token query (15,000 new tokens), Qwen3-0.6B widths (hidden 1024, 16/8
heads, head_dim 128, MLP 3072), bf16. For each op: the time (``triton.testing.do_bench``,
median), the achieved TFLOP/s or GB/s, and the op the engine's torch path runs instead, timed
the same way:

* matmuls: q/k/v and gate/up merged (the Triton path) vs separate (the torch path), o, down;
* extend attention: the Triton kernel with its default tile and a few others (``tile=``) vs the
  torch path's padded SDPA over pool slots;
* fused add + RMSNorm, q/k norm + rotary, SiLU-and-mul vs the torch ops they replace.

The sum of one layer's ops on each path times 28 layers is the step's modelled time, and its
items/s what the step would give with no host time at all (compare with ``gpu.py``, which
measures the whole engine). This says which op to work on next.

    python benchmarks/gpu_kernels.py            # on a CUDA machine, ~1 min
    python benchmarks/gpu_kernels.py --smoke    # tiny shapes on the CPU (interpreter), checks
                                                # every variant against the default
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from slmserve.interfaces import ForwardBatch
from slmserve.models import rope
from slmserve.models.attention import attend, plan_attention
from slmserve.models.decoder import RMSNorm

FULL = {"items": 50, "new": 300, "prefix": 200, "hidden": 1024, "heads": 16, "kv_heads": 8,
        "head_dim": 128, "mlp": 3072, "layers": 28}  # fmt: skip
SMOKE = {"items": 3, "new": 20, "prefix": 9, "hidden": 64, "heads": 4, "kv_heads": 2,
         "head_dim": 32, "mlp": 96, "layers": 2}  # fmt: skip
# (block_m, block_n, num_warps, pack_gqa); the first is the engine's default. Packed tiles
# stack the query heads of a KV group as rows (block_m tokens each), reading K/V once per group.
TILES = [
    (64, 64, 4, False),
    (128, 64, 8, False),
    (64, 32, 4, False),
    (64, 64, 8, False),
    (32, 64, 4, True),
    (64, 64, 8, True),
]


def timer(smoke: bool) -> Callable[[Callable[[], Any]], float]:
    """Seconds per call: CUDA-event timing on a GPU, one wall-clock call in the smoke run."""
    if smoke:

        def once(fn: Callable[[], Any]) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return once
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3


def scoring_batch(s: dict[str, int], device: str) -> ForwardBatch:
    """Every item's context: the shared prefix's slots, then its own new tokens' slots."""
    prefix = list(range(s["prefix"]))
    contexts, next_slot = [], s["prefix"]
    for _ in range(s["items"]):
        contexts.append(prefix + list(range(next_slot, next_slot + s["new"])))
        next_slot += s["new"]
    new_lens = [s["new"]] * s["items"]
    ctx_lens = [len(c) for c in contexts]
    total = sum(new_lens)
    t = lambda x: torch.tensor(x, device=device)  # noqa: E731
    return ForwardBatch(
        input_ids=torch.zeros(total, dtype=torch.int64, device=device),
        positions=t([p for _ in contexts for p in range(s["prefix"], s["prefix"] + s["new"])]),
        out_slots=t([x for c in contexts for x in c[-s["new"] :]]),
        cu_new=t([0, *accumulate(new_lens)]),
        context_slots=t([x for c in contexts for x in c]),
        cu_ctx=t([0, *accumulate(ctx_lens)]),
        logit_indices=t([n - 1 for n in accumulate(new_lens)]),
        new_lens=new_lens,
        ctx_lens=ctx_lens,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or use --smoke for the CPU check")
    from slmserve.kernels.extend import extend_attention
    from slmserve.kernels.fused import add_rms_norm, norm_rope, silu_mul

    s = SMOKE if args.smoke else FULL
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    bench = timer(args.smoke)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    batch = scoring_batch(s, device)
    tokens, hid, heads, kvh, d, mlp = (
        batch.num_tokens, s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["mlp"],
    )  # fmt: skip
    # (path, op, seconds, amount, unit, times per layer)
    rows: list[tuple[str, str, float, float, str, int]] = []

    def row(
        path: str, op: str, fn: Callable[[], Any], amount: float, unit: str, per_layer: int = 1
    ) -> None:
        rows.append((path, op, bench(fn), amount, unit, 0 if path == "tile" else per_layer))

    # --- matmuls: 2 FLOPs per weight per token
    x = rand(tokens, hid)
    w = {n: rand(o, hid) * 0.02 for n, o in [("q", heads * d), ("k", kvh * d), ("v", kvh * d),
                                             ("gate", mlp), ("up", mlp)]}  # fmt: skip
    w_o, w_down = rand(hid, heads * d) * 0.02, rand(hid, mlp) * 0.02
    qkv = torch.cat([w["q"], w["k"], w["v"]])
    gate_up = torch.cat([w["gate"], w["up"]])
    flops = lambda rows_out: 2.0 * tokens * hid * rows_out  # noqa: E731
    row("triton", "qkv matmul (merged)", lambda: F.linear(x, qkv), flops(qkv.shape[0]), "flop")
    row("torch", "q, k, v matmuls", lambda: [F.linear(x, w[n]) for n in "qkv"],
        flops(qkv.shape[0]), "flop")  # fmt: skip
    o_in = rand(tokens, heads * d)
    row("both", "o matmul", lambda: F.linear(o_in, w_o), 2.0 * tokens * hid * heads * d, "flop")
    row("triton", "gate_up matmul (merged)", lambda: F.linear(x, gate_up), flops(2 * mlp), "flop")
    row("torch", "gate, up matmuls", lambda: [F.linear(x, w[n]) for n in ("gate", "up")],
        flops(2 * mlp), "flop")  # fmt: skip
    act = rand(tokens, mlp)
    row("both", "down matmul", lambda: F.linear(act, w_down), 2.0 * tokens * hid * mlp, "flop")

    # --- attention over pool slots: QK^T and PV over every visible key
    num_slots = s["prefix"] + s["items"] * s["new"]
    q = rand(tokens, heads, d)
    k_pool, v_pool = rand(num_slots, kvh, d), rand(num_slots, kvh, d)
    visible = s["items"] * sum(s["prefix"] + j + 1 for j in range(s["new"]))
    attn_flops = 4.0 * heads * d * visible
    scale = 1 / math.sqrt(d)
    seqs = torch.arange(s["items"], device=device)
    torch_plan = plan_attention(batch, "torch")
    reference = attend(q, k_pool, v_pool, torch_plan, scale).float()
    for block_m, block_n, warps, pack in TILES:
        out = torch.empty_like(q)
        name = f"extend attention {block_m}x{block_n}, {warps} warps{', packed GQA' * pack}"

        def run(
            out: torch.Tensor = out,
            tile: tuple[int, int, int] = (block_m, block_n, warps),
            pack: bool = pack,
        ) -> None:
            extend_attention(q, k_pool, v_pool, out, seqs=seqs, max_new=s["new"],
                             cu_new=batch.cu_new, cu_ctx=batch.cu_ctx,
                             context_slots=batch.context_slots, scale=scale, tile=tile,
                             pack_gqa=pack)  # fmt: skip

        try:
            run()
            # every tile computes what the torch path does
            torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
        except Exception as exc:  # one failing variant must not hide the others' times
            print(f"{name}: FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            if args.smoke:
                raise
            continue
        row("triton" if (block_m, block_n, warps, pack) == TILES[0] else "tile", name, run,
            attn_flops, "flop")  # fmt: skip
    row("torch", "attention (padded SDPA)", lambda: attend(q, k_pool, v_pool, torch_plan, scale),
        attn_flops, "flop")  # fmt: skip

    # --- element-wise: bytes that must move at least (read inputs, write outputs, once)
    size = torch.tensor([], dtype=dtype).element_size()
    h, delta = rand(tokens, hid), rand(tokens, hid)
    norm = RMSNorm(hid, 1e-6).to(device, dtype)
    # Two per layer: before attention and before the MLP.
    row("triton", "add + RMSNorm (fused)", lambda: add_rms_norm(delta, norm.weight, 1e-6, h),
        4.0 * tokens * hid * size, "byte", per_layer=2)  # fmt: skip
    row("torch", "add, RMSNorm", lambda: norm(h + delta), 4.0 * tokens * hid * size, "byte",
        per_layer=2)  # fmt: skip
    positions = torch.arange(tokens, device=device) % 4096
    inv_freq = (1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))).to(device)
    cos, sin = rope.cos_sin(positions, inv_freq, 1.0, dtype)
    qn, kn = RMSNorm(d, 1e-6).to(device, dtype), RMSNorm(d, 1e-6).to(device, dtype)
    k_new = rand(tokens, kvh, d)
    qk_bytes = 2.0 * tokens * (heads + kvh) * d * size

    def fused_qk() -> None:
        norm_rope(q, qn.weight, 1e-6, cos, sin)
        norm_rope(k_new, kn.weight, 1e-6, cos, sin)

    def torch_qk() -> None:
        rope.apply_rotary(qn(q), cos, sin)
        rope.apply_rotary(kn(k_new), cos, sin)

    row("triton", "q/k norm + rotary (fused)", fused_qk, qk_bytes, "byte")
    row("torch", "q/k norm, rotary", torch_qk, qk_bytes, "byte")
    gate, up = rand(tokens, mlp), rand(tokens, mlp)
    row("triton", "SiLU * up (fused)", lambda: silu_mul(gate, up), 3.0 * tokens * mlp * size,
        "byte")  # fmt: skip
    row("torch", "silu, mul", lambda: F.silu(gate) * up, 3.0 * tokens * mlp * size, "byte")

    where = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"\n## per-op times, {tokens:,}-token scoring step, {where}, {dtype}\n")
    print("| path | op | µs | rate |")
    print("|---|---|---|---|")
    for path, op, sec, amount, unit, _ in rows:
        rate = amount / sec / 1e12 if unit == "flop" else amount / sec / 1e9
        print(f"| {path} | {op} | {sec * 1e6:,.0f} | "
              f"{rate:,.1f} {'TFLOP/s' if unit == 'flop' else 'GB/s'} |")  # fmt: skip
    per_layer = {
        p: sum(sec * n for path, _, sec, _, _, n in rows if path in (p, "both"))
        for p in ("triton", "torch")
    }
    print("\n| path | modelled layer µs | step ms (x layers) | items/s, no host time |")
    print("|---|---|---|---|")
    for p, sec in per_layer.items():
        step = sec * s["layers"]
        print(f"| {p} | {sec * 1e6:,.0f} | {step * 1e3:,.1f} | {s['items'] / step:,.0f} |")


if __name__ == "__main__":
    main()
