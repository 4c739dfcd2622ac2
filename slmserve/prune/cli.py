"""``slmserve prune``: OSSCAR (or a baseline) on a local checkpoint, written as a smaller one.

    slmserve prune --model DIR --out DIR --mlp-keep 0.6 --kv-groups-keep 0.5 \\
        --method osscar --calib calib.txt --samples 128 --seq-len 512 --local-search

``--mlp-keep`` / ``--kv-groups-keep`` take one fraction for every layer, or a comma-separated
list with one per layer (unequal sizes are recorded as ``layer_shapes`` and need slmserve's
``native`` or ``osscar`` backend). Writes ``OUT`` (safetensors, config, tokenizer files) and
``OUT/prune_report.json``; prints a per-layer table.

``add_prune_parser(subparsers, plugins)`` registers the sub-command and returns its handler.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmserve.config import ConfigError
from slmserve.plugins import PluginManager
from slmserve.prune import METHODS


def add_prune_parser(subparsers: Any, plugins: PluginManager) -> Callable[..., int]:
    """Add the ``prune`` sub-command to ``subparsers``; return its handler."""
    p = subparsers.add_parser("prune", help="structured pruning (OSSCAR) into a smaller checkpoint")
    p.add_argument("--model", required=True, help="Llama/Qwen2/Qwen3 checkpoint directory")
    p.add_argument("--out", required=True, help="directory for the pruned checkpoint")
    p.add_argument(
        "--mlp-keep", default="1", help="fraction of MLP neurons kept (one, or one per layer)"
    )
    p.add_argument(
        "--kv-groups-keep", default="1", help="fraction of KV groups kept (one, or one per layer)"
    )
    p.add_argument("--method", choices=METHODS, default="osscar")
    p.add_argument("--calib", required=True, metavar="FILE.txt|FILE.jsonl", help="calibration")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--local-search", action="store_true", help="OSSCAR swap search after greedy")
    p.add_argument("--local-iter", type=int, default=30, help="most local-search iterations")
    p.add_argument("--swap-size", type=int, default=10, help="first local-search swap size")
    p.add_argument("--update-iter", type=int, default=1, help="groups removed per greedy step")
    p.add_argument("--damping", type=float, default=0.01, help="fraction of mean diag(XᵀX)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--torch-threads", type=int, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return cmd_prune


def parse_keep(text: str, flag: str) -> float | list[float]:
    """``"0.6"`` -> 0.6; ``"0.8,0.6"`` -> [0.8, 0.6]."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"{flag} must be a fraction or a comma-separated list, got {text!r}"
        ) from None
    for v in values:
        if not 0.0 < v <= 1.0:
            raise ConfigError(f"{flag} must be in (0, 1], got {v:g}")
    return values[0] if len(values) == 1 else values


def _check_args(args: argparse.Namespace) -> None:
    for name in ("samples", "seq_len", "local_iter", "swap_size", "update_iter", "batch_size"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.damping <= 0:
        raise ConfigError(f"--damping must be > 0, got {args.damping}")
    if args.local_search and args.method != "osscar":
        raise ConfigError("--local-search applies to --method osscar only")
    out, model = Path(args.out).resolve(), Path(args.model).resolve()
    if out == model:
        raise ConfigError("--out must differ from --model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {args.out} exists and is not an empty directory")


def format_table(report: dict[str, Any]) -> str:
    """Per-layer kept sizes and relative reconstruction errors, then the parameter counts."""
    lines = [
        f"{'layer':>5}  {'MLP neurons':>13}  {'KV groups':>9}  {'attn err':>9}  {'MLP err':>9}"
    ]
    for i, layer in enumerate(report["layers"]):
        mlp = f"{layer['mlp_kept']}/{layer['mlp_total']}"
        kv = f"{layer['kv_kept']}/{layer['kv_total']}"
        lines.append(
            f"{i:>5}  {mlp:>13}  {kv:>9}  {layer['attn_error']:>9.4f}  {layer['mlp_error']:>9.4f}"
        )
    before, after = report["parameters_before"], report["parameters_after"]
    lines.append(f"parameters: {before:,} -> {after:,} ({after / before:.1%})")
    return "\n".join(lines)


def cmd_prune(args: argparse.Namespace, plugins: PluginManager) -> int:
    from transformers.utils import logging as hf_logging

    # transformers' own loading/saving bars and long-input warnings are noise here.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _prune(args)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _prune(args: argparse.Namespace) -> int:
    _check_args(args)
    mlp_keep = parse_keep(args.mlp_keep, "--mlp-keep")
    kv_keep = parse_keep(args.kv_groups_keep, "--kv-groups-keep")

    import torch
    from tqdm import tqdm

    from slmserve.models.loader import load_tokenizer, read_config, resolve_device
    from slmserve.prune.calibration import make_windows, read_documents, token_stream
    from slmserve.prune.pack import count_parameters, pack_model, save_packed
    from slmserve.prune.pipeline import PruneOptions, plan_budgets, prune_model

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = read_config(args.model)  # unsupported architectures fail here, before any loading
    try:
        docs = read_documents(args.calib)
        device = resolve_device(args.device)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model.eval()
    try:
        budgets = plan_budgets(model, mlp_keep, kv_keep)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    layers = model.model.layers
    if all(
        b.mlp_keep == layer.mlp.down_proj.in_features
        and b.kv_keep * layer.self_attn.head_dim == layer.self_attn.k_proj.out_features
        for b, layer in zip(budgets, layers)
    ):
        raise ConfigError("nothing to prune: --mlp-keep and --kv-groups-keep keep everything")
    tokenizer = load_tokenizer(Path(args.model))
    seq_len = min(args.seq_len, int(cfg.get("max_position_embeddings") or args.seq_len))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = make_windows(token_stream(tokenizer, docs), args.samples, seq_len, pad)
    options = PruneOptions(
        method=args.method,
        damping=args.damping,
        update_iter=args.update_iter,
        local_search=args.local_search,
        local_iter=args.local_iter,
        swap_size=args.swap_size,
        batch_size=args.batch_size,
    )
    before = count_parameters(model)
    start = time.perf_counter()
    bar = tqdm(total=len(layers), desc="prune", unit="layer", disable=args.no_progress)

    def progress(i: int, res: Any) -> None:
        bar.set_postfix(attn=f"{res.attn_error:.4f}", mlp=f"{res.mlp_error:.4f}")
        bar.update()

    with bar:
        result = prune_model(model, windows, budgets, options, progress)
    seconds = time.perf_counter() - start
    report = {
        "method": args.method,
        "local_search": args.local_search,
        "mlp_keep": mlp_keep,
        "kv_groups_keep": kv_keep,
        "damping": args.damping,
        "calibration": {
            "file": Path(args.calib).name,
            "windows": len(windows.ids),
            "seq_len": seq_len,
            "tokens": result.calibration_tokens,
        },
        "parameters_before": before,
        "seconds": round(seconds, 2),
        "layers": [
            {
                "mlp_kept": len(r.mlp_kept),
                "mlp_total": r.mlp_total,
                "kv_kept": len(r.kv_kept),
                "kv_total": r.kv_total,
                "attn_error": r.attn_error,
                "mlp_error": r.mlp_error,
            }
            for r in result.layers
        ],
    }
    meta = {k: v for k, v in report.items() if k != "layers"}
    uniform = pack_model(model, result, meta)
    after = count_parameters(model)
    report["parameters_after"] = model.config.slmserve["pruning"]["parameters_after"] = after
    out = save_packed(model, args.out, args.model)
    (out / "prune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    if uniform:
        print(f"wrote {out}: uniform layers (transformers, --backend native or osscar load it)")
    else:
        print(
            f"wrote {out}: per-layer widths (layer_shapes): serve with --backend osscar or native"
        )
    return 0
