"""``slmserve score``: score a JSONL catalog against one query, offline, with a progress bar.

Items go to the engine in chunks of ``--batch-size``: every chunk extends the same query prefix,
which stays in the radix cache between chunks, so chunking costs almost nothing while keeping
the progress bar live and memory bounded. Kept apart from ``cli.py`` so the scoring tool and
its file handling do not grow the main command module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmserve.compressors import count_tokens, run_chain
from slmserve.interfaces import Compressor, PluginError
from slmserve.plugins import PluginManager


def add_score_parser(subparsers: Any, plugins: PluginManager) -> Callable[..., int]:
    """Add the ``score`` sub-command to ``subparsers``; return its handler."""
    from slmserve.cli import add_engine_args  # here: cli.py imports this module

    p = subparsers.add_parser("score", help="score JSONL items against a query")
    p.add_argument("--query", required=True, help="the query text")
    p.add_argument("--items", required=True, metavar="FILE.jsonl", help='{"id", "text"} per line')
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="label texts, comma separated, one token each (Y,N)")
    labels.add_argument("--label-token-ids", help="label token ids, comma separated")
    p.add_argument("--template", help="prompt template with {query} and {item}")
    p.add_argument("--item-first", action="store_true", help="item before query (no sharing)")
    p.add_argument("--raw", action="store_true", help="label log-probs instead of softmax")
    p.add_argument(
        "--compressor", action="append", metavar="NAME", choices=plugins.compressors.names()
    )
    p.add_argument(
        "--compressor-opt",
        action="append",
        metavar="KEY=VALUE",
        help="option of the last --compressor",
    )
    p.add_argument("--batch-size", type=int, default=64, help="items per engine call")
    p.add_argument("--output", metavar="FILE.jsonl", help="default: standard output")
    p.add_argument("--no-progress", action="store_true")
    add_engine_args(p, plugins)
    return cmd_score


def read_items(path: Path) -> list[tuple[Any, str]]:
    """``(id, text)`` per non-blank line; a bad line is a CLIError naming it."""
    from slmserve.cli import CLIError, read_jsonl

    out = []
    for lineno, record in read_jsonl(path, "items"):
        if not isinstance(record, dict) or "id" not in record:
            raise CLIError(f'{path}:{lineno}: expected an object with "id" and "text"')
        text = record.get("text")
        if not isinstance(text, str) or not text:
            raise CLIError(f'{path}:{lineno}: "text" must be a non-empty string')
        out.append((record["id"], text))
    if not out:
        raise CLIError(f"{path}: no items")
    return out


def compressor_chain(args: argparse.Namespace, plugins: PluginManager) -> list[Compressor]:
    """The chain of ``--compressor`` names in order; ``--compressor-opt`` values configure the
    last one (argparse keeps no interleaving; chain options per link through the HTTP API)."""
    from slmserve.cli import CLIError
    from slmserve.config import parse_options

    names = args.compressor or []
    if args.compressor_opt and not names:
        raise CLIError("--compressor-opt needs a --compressor")
    options: list[dict[str, Any]] = [{} for _ in names]
    if names:
        options[-1] = parse_options(args.compressor_opt)
    out = []
    for name, opts in zip(names, options):
        try:
            out.append(plugins.compressors.get(name)(**opts))
        except (TypeError, ValueError, PluginError) as exc:
            raise CLIError(f"compressor {name!r}: {exc}") from None
    return out


def _label_ids(args: argparse.Namespace, tokenizer: Any) -> list[int]:
    from slmserve.cli import CLIError
    from slmserve.compressors import encode

    if args.label_token_ids:
        try:
            return [int(x) for x in args.label_token_ids.split(",")]
        except ValueError:
            raise CLIError("--label-token-ids must be comma-separated integers") from None
    out = []
    for label in args.labels.split(","):
        ids = encode(tokenizer, label)
        if len(ids) != 1:
            raise CLIError(f"label {label!r} is {len(ids)} tokens; each must be exactly one")
        out.append(ids[0])
    return out


def cmd_score(args: argparse.Namespace, plugins: PluginManager) -> int:
    """Score every item; write ``{"id", "score", "scores"}`` per line in input order."""
    from tqdm.auto import tqdm

    from slmserve.cli import CLIError, engine_config, engine_errors, open_output
    from slmserve.engine import Engine

    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    if not args.query:
        raise CLIError("--query is empty: give the text the items are scored against")
    records = read_items(Path(args.items))
    compressors = compressor_chain(args, plugins)
    out = open_output(args.output) or sys.stdout  # before the work: a bad path fails now
    with engine_errors():
        engine = Engine(engine_config(args), plugins=plugins)

    async def run() -> tuple[list[list[float]], int, int, int, int]:
        rows: list[list[float]] = []
        prompt = cached = before = after = 0
        async with engine:
            tok = engine.tokenizer
            labels = _label_ids(args, tok)
            bar = tqdm(total=len(records), unit="item", disable=args.no_progress, file=sys.stderr)
            with bar:
                for start in range(0, len(records), args.batch_size):
                    texts = [text for _, text in records[start : start + args.batch_size]]
                    if compressors:
                        before += sum(count_tokens(tok, t) for t in texts)
                        texts = await asyncio.to_thread(
                            run_chain, compressors, texts, args.query, tok
                        )
                        after += sum(count_tokens(tok, t) for t in texts)
                    try:
                        res = await engine.score(
                            args.query,
                            texts,
                            label_token_ids=labels,
                            apply_softmax=not args.raw,
                            item_first=args.item_first,
                            template=args.template,
                        )
                    except ValueError as exc:
                        raise CLIError(_renumber(str(exc), start, records)) from None
                    rows.extend(res.scores)
                    prompt += res.prompt_tokens
                    cached += res.cached_tokens
                    bar.update(len(texts))
        return rows, prompt, cached, before, after

    try:
        with engine_errors():
            rows, prompt, cached, before, after = asyncio.run(run())
        for (item_id, _), row in zip(records, rows):
            out.write(json.dumps({"id": item_id, "score": row[0], "scores": row}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    ratio = f", compression {before / after:.2f}x" if after else ""
    print(
        f"scored {len(rows)} items: {prompt} prompt tokens, {cached} from the cache{ratio}",
        file=sys.stderr,
    )
    return 0


def _renumber(message: str, start: int, records: list[tuple[Any, str]]) -> str:
    """Engine errors name the item's index within its chunk: name the file's id instead."""
    import re

    def sub(match: re.Match[str]) -> str:
        index = start + int(match.group(1))
        return f"item {records[index][0]!r} (#{index + 1})"

    return re.sub(r"\bitem (\d+)\b", sub, message)
