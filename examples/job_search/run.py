#!/usr/bin/env python3
"""Score a synthetic job catalog through ``POST /v1/score`` with each context compressor.

For every query, the whole catalog goes to the server in one request — once with no
compressor, then with ``truncate``, ``extractive`` and ``summary`` at the same token budget —
and the script prints one row per compressor: items scored per second, the mean compression
ratio the server reported, and how many prompt tokens came from the prefix cache. ``summary``
runs twice: the first pass writes the summaries (the model call LinkedIn makes offline), the
second reads them back from the SQLite cache (what serving costs once a catalog is summarised).

By default the script starts ``slmserve serve`` on the embedded demo model (random weights: the
scores are meaningless, the costs are real) and stops it at the end; ``--url`` talks to a server
that is already running instead.

    python examples/job_search/run.py                 # 32 postings, 2 queries, ~1-2 minutes
    python examples/job_search/run.py --items 300 --queries 6
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog import QUERIES, make_catalog

TEMPLATE = "Job search query: {query}\nJob posting: {item}\nIs this posting relevant (Y/N)? "


@dataclass
class Row:
    """What one compressor cost over every query."""

    name: str
    items: int = 0
    seconds: float = 0.0
    ratios: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, n_items: int, seconds: float, usage: dict[str, Any]) -> None:
        self.items += n_items
        self.seconds += seconds
        self.requests += 1
        self.ratios += usage.get("compression_ratio", 1.0)
        self.prompt_tokens += usage["prompt_tokens"]
        self.cached_tokens += usage["cached_tokens"]

    def line(self) -> str:
        rate = self.items / self.seconds if self.seconds else 0.0
        ratio = self.ratios / self.requests if self.requests else 1.0
        return (
            f"{self.name:<22} {rate:>9.1f} {ratio:>11.2f}x {self.prompt_tokens:>13} "
            f"{self.cached_tokens:>13}"
        )


def post(url: str, body: dict[str, Any], api_key: str | None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url + "/v1/score", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=1800) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"/v1/score failed ({exc.code}): {exc.read().decode()}") from None


def compressors(args: argparse.Namespace, cache: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(row name, compressor chain) in the order they run; ``summary`` twice (cold, cached)."""
    summary: dict[str, Any] = {"max_tokens": args.budget, "cache": cache}
    if args.summary_model:
        summary["model"] = args.summary_model
    return [
        ("none", []),
        ("truncate", [{"name": "truncate", "options": {"max_tokens": args.budget}}]),
        ("extractive", [{"name": "extractive", "options": {"max_tokens": args.budget}}]),
        ("summary (first sight)", [{"name": "summary", "options": summary}]),
        ("summary (cached)", [{"name": "summary", "options": summary}]),
    ]


def run(url: str, args: argparse.Namespace, cache: str) -> list[Row]:
    items = [p["text"] for p in make_catalog(args.items, args.seed)]
    queries = QUERIES[: args.queries]
    rows = []
    for number, (name, chain) in enumerate(compressors(args, cache)):
        row = Row(name)
        # A per-row tag ahead of the query, so no row reads the items of an earlier row from
        # the radix cache (truncate and a blank summary can give the very same texts).
        template = f"[run {number}] {TEMPLATE}"
        for query in queries:
            body = {
                "query": query,
                "items": items,
                "labels": args.labels.split(","),
                "template": template,
                "compressor": chain,
            }
            start = time.perf_counter()
            data = post(url, body, args.api_key)
            row.add(len(items), time.perf_counter() - start, data["usage"])
        rows.append(row)
        print(row.line(), flush=True)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, log: IO[bytes]) -> tuple[subprocess.Popen[bytes], str]:
    """``slmserve serve`` on a free port, its output to ``log``; returns once ``/ready``
    answers."""
    port = free_port()
    command = [sys.executable, "-m", "slmserve", "serve", "--port", str(port)]
    command += ["--device", args.device, "--kv-tokens", str(args.kv_tokens)]
    if args.model:
        command += ["--model", args.model]
    if args.torch_threads:
        command += ["--torch-threads", str(args.torch_threads)]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"slmserve serve exited with status {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2):
                return proc, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("slmserve serve did not become ready within 300 s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one on the demo model)")
    parser.add_argument("--api-key", default=os.environ.get("SLMSERVE_API_KEY"))
    parser.add_argument("--items", type=int, default=32, help="postings in the catalog")
    parser.add_argument("--queries", type=int, default=2, help=f"queries (at most {len(QUERIES)})")
    parser.add_argument("--seed", type=int, default=0, help="catalog seed")
    parser.add_argument("--budget", type=int, default=96, help="tokens per item after compression")
    parser.add_argument("--labels", default="Y,N", help="yes/no label texts, one token each")
    parser.add_argument("--summary-model", help="summariser checkpoint (default: the demo model)")
    parser.add_argument("--summary-cache", help="SQLite file (default: a fresh temporary one)")
    parser.add_argument("--model", help="checkpoint for the server this script starts")
    parser.add_argument("--device", default="cpu", help="device for the server it starts")
    parser.add_argument("--kv-tokens", type=int, default=65536, help="KV pool of that server")
    parser.add_argument("--torch-threads", type=int, help="CPU threads of that server")
    args = parser.parse_args(argv)
    if args.items < 1 or not 1 <= args.queries <= len(QUERIES) or args.budget < 1:
        parser.error(f"need --items >= 1, 1 <= --queries <= {len(QUERIES)}, --budget >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+b") as log:
        cache = args.summary_cache or str(Path(tmp) / "summaries.sqlite")
        proc, url = (None, args.url) if args.url else start_server(args, log)
        print(
            f"{args.items} postings x {args.queries} queries, budget {args.budget} tokens, "
            f"server {url}"
        )
        print(f"{'compressor':<22} {'items/s':>9} {'mean ratio':>12} {'prompt tokens':>13} "
              f"{'cached tokens':>13}")  # fmt: skip
        try:
            run(url.rstrip("/"), args, cache)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
