"""``slmserve compress``: run a compressor chain over a JSONL catalog ahead of serving.

The point is the ``summary`` compressor: summarising a posting takes a model call, so a
catalog is summarised once, offline, in batches, and the server later reads every summary from
the same SQLite cache. Any chain works (``truncate``, ``extractive`` …), which also makes this
the quick way to see what a compressor does to a catalog and what ratio it reaches. Token
counts and budgets are the *serving* model's (``--model``), as in ``slmserve score``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmserve.compressors import count_tokens
from slmserve.plugins import PluginManager


def add_compress_parser(subparsers: Any, plugins: PluginManager) -> Callable[..., int]:
    """Add the ``compress`` sub-command to ``subparsers``; return its handler."""
    p = subparsers.add_parser("compress", help="compress a JSONL catalog (fills the summary cache)")
    p.add_argument("--items", required=True, metavar="FILE.jsonl", help='{"id", "text"} per line')
    p.add_argument("--query", default="", help="query for query-aware compressors (extractive)")
    p.add_argument(
        "--compressor",
        action="append",
        required=True,
        metavar="NAME",
        choices=plugins.compressors.names(),
        help="compressor to run (repeat to chain)",
    )
    p.add_argument(
        "--compressor-opt",
        action="append",
        metavar="KEY=VALUE",
        help="option of the last --compressor",
    )
    p.add_argument(
        "--model", help="serving checkpoint whose tokenizer counts tokens (default: the demo)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="items per compressor call")
    p.add_argument("--torch-threads", type=int, help="CPU threads for a summary model")
    p.add_argument("--output", metavar="FILE.jsonl", help='write {"id", "text"} per item')
    p.add_argument("--no-progress", action="store_true")
    return cmd_compress


def cmd_compress(args: argparse.Namespace, plugins: PluginManager) -> int:
    """Compress every item in batches; report cache use, tokens before/after and the ratio."""
    from tqdm.auto import tqdm

    from slmserve.cli import CLIError
    from slmserve.compressors import run_chain
    from slmserve.score_cli import compressor_chain, read_items

    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise CLIError("--torch-threads must be at least 1")
        import torch

        torch.set_num_threads(args.torch_threads)
    records = read_items(Path(args.items))
    compressors = compressor_chain(args, plugins)
    tokenizer = serving_tokenizer(args.model)
    try:
        out = open(args.output, "w") if args.output else None  # noqa: SIM115
    except OSError as exc:
        raise CLIError(f"cannot write --output: {exc}") from None
    before = after = 0
    start = time.perf_counter()
    bar = tqdm(total=len(records), unit="item", disable=args.no_progress, file=sys.stderr)
    try:
        with bar:
            for first in range(0, len(records), args.batch_size):
                batch = records[first : first + args.batch_size]
                texts = [text for _, text in batch]
                try:
                    done = run_chain(compressors, texts, args.query, tokenizer)
                except (ValueError, RuntimeError) as exc:  # bad input, or a plugin's bug named
                    raise CLIError(str(exc)) from None
                before += sum(count_tokens(tokenizer, t) for t in texts)
                after += sum(count_tokens(tokenizer, t) for t in done)
                if out is not None:
                    for (item_id, _), text in zip(batch, done):
                        out.write(json.dumps({"id": item_id, "text": text}) + "\n")
                bar.update(len(batch))
    finally:
        if out is not None:
            out.close()
    seconds = time.perf_counter() - start
    ratio = before / after if after else 1.0
    print(
        f"compressed {len(records)} items in {seconds:.1f} s: {before} -> {after} tokens "
        f"({ratio:.2f}x)",
        file=sys.stderr,
    )
    for compressor in compressors:
        stats = getattr(compressor, "stats", None)
        if stats is not None:
            print(
                f"{compressor.name}: {stats.hits} cache hits, {stats.generated} generated, "
                f"{stats.short} already within the budget",
                file=sys.stderr,
            )
    return 0


def serving_tokenizer(model: str | None) -> Any:
    """The tokenizer of ``model`` (a checkpoint directory; the demo model when unset), without
    loading the weights."""
    from slmserve.cli import CLIError
    from slmserve.models.loader import load_tokenizer

    if model in (None, "demo"):
        from slmserve.models.demo import ensure_demo_model

        return load_tokenizer(ensure_demo_model())
    path = Path(model).expanduser()  # type: ignore[arg-type]
    if not path.is_dir():
        raise CLIError(f"--model: directory {str(path)!r} does not exist")
    try:
        return load_tokenizer(path)
    except OSError as exc:
        raise CLIError(f"--model: {exc}") from None
