"""The ``slmserve`` command: one sub-command per tool, all sharing the engine's config."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import msgspec

from slmserve.compress_cli import add_compress_parser
from slmserve.config import ConfigError, EngineConfig, load_config, parse_options
from slmserve.interfaces import PluginError
from slmserve.plan.cli import add_plan_parsers
from slmserve.plugins import PluginManager
from slmserve.prune.cli import add_prune_parser
from slmserve.routing.cli import add_route_parser
from slmserve.score_cli import add_score_parser
from slmserve.sim.cli import add_simulate_parser

log = logging.getLogger("slmserve")


class CLIError(Exception):
    """A user mistake on the command line; printed without a traceback, exit status 2."""


def add_engine_args(parser: argparse.ArgumentParser, plugins: PluginManager) -> None:
    """Engine flags; choices come from the live plugin registry."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    g.add_argument("--config", metavar="FILE.toml", help="engine settings file")
    g.add_argument("--backend", choices=plugins.backends.names())
    g.add_argument(
        "--backend-opt", action="append", metavar="KEY=VALUE", help="backend option (attention=)"
    )
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--scheduler", choices=plugins.schedulers.names())
    g.add_argument("--scheduler-opt", action="append", metavar="KEY=VALUE", help="scheduler option")
    g.add_argument("--kv-tokens", type=int, help="KV cache size in tokens")
    g.add_argument("--max-batch-tokens", type=int, help="token budget per step")
    g.add_argument("--chunked-prefill-size", type=int, help="largest prefill chunk per request")
    g.add_argument("--max-running-requests", type=int)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--torch-threads", type=int, help="CPU threads for torch (default: torch's)")
    g.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_const",
        const=False,
        default=None,
        help="on CUDA, run decode steps eagerly instead of replaying captured graphs",
    )
    g.add_argument(
        "--overlap",
        choices=["auto", "on", "off"],
        help="plan and launch the next step while this one runs (auto: on for CUDA)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    options = parse_options(args.scheduler_opt)
    overrides: dict[str, Any] = {
        "model": args.model,
        "backend": args.backend,
        "device": args.device,
        "dtype": args.dtype,
        "scheduler": args.scheduler,
        "scheduler_options": options or None,
        "backend_options": parse_options(args.backend_opt) or None,
        "kv_tokens": args.kv_tokens,
        "max_batch_tokens": args.max_batch_tokens,
        "chunked_prefill_size": args.chunked_prefill_size,
        "max_running_requests": args.max_running_requests,
        "max_model_len": args.max_model_len,
        "seed": args.seed,
        "torch_threads": args.torch_threads,
        "cuda_graphs": args.cuda_graphs,
        "overlap": args.overlap,
    }
    return load_config(args.config, overrides)


# -------------------------------------------------------------------------- plugins


def cmd_plugins(args: argparse.Namespace, plugins: PluginManager) -> int:
    kinds = {
        "schedulers": plugins.schedulers,
        "compressors": plugins.compressors,
        "backends": plugins.backends,
        "routers": plugins.routers,
    }
    rows = {
        kind: [
            {
                "name": e.name,
                "plugin": e.plugin,
                "distribution": e.distribution,
                "version": e.version,
                "description": e.description,
            }
            for e in registry.entries()
        ]
        for kind, registry in kinds.items()
    }
    if args.json:
        print(json.dumps({**rows, "plugins": plugins.plugin_names()}, indent=2))
        return 0
    for kind, entries in rows.items():
        print(f"{kind}:")
        if not entries:
            print("  (none)")
        for e in entries:
            origin = f"{e['distribution']} {e['version']}".strip()
            print(f"  {e['name']:<14} {e['description']:<48} [{e['plugin']}; {origin}]")
    return 0


# -------------------------------------------------------------------------- generate


def read_jsonl(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """``(line number, decoded value)`` for each non-blank line; errors name file and line."""
    if not path.exists():
        raise CLIError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {what} file {path}: {exc}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def open_output(path: str | None) -> TextIO | None:
    """``path`` opened for writing (``None`` for none): a CLIError naming it if it cannot be."""
    if not path:
        return None
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Errors of an engine built from the command line (a model that cannot load, an option a
    plugin refuses, a prompt it cannot serve) as one-line CLI errors; ``--log-level debug``
    logs the traceback."""
    try:
        yield
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        logging.getLogger("slmserve").debug("engine error", exc_info=True)
        raise CLIError(f"{type(exc).__name__}: {exc}") from None


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.input:
        path = Path(args.input)
        for lineno, record in read_jsonl(path, "input"):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise CLIError(f'{path}:{lineno}: expected an object with a "prompt" string')
            prompts.append(record["prompt"])
    if not prompts:
        raise CLIError("give at least one prompt, or --input FILE.jsonl")
    return prompts


def cmd_generate(args: argparse.Namespace, plugins: PluginManager) -> int:
    from slmserve.engine import Engine
    from slmserve.types import SamplingParams

    prompts = _read_prompts(args)
    config = engine_config(args)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.sampling_seed,
            stop=args.stop or [],
            ignore_eos=args.ignore_eos,
        ).check()
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    out = open_output(args.output)  # before the work: a bad path fails now, not after it
    try:
        with engine_errors():
            engine = Engine(config, plugins=plugins)
            results = engine.generate_batch(prompts, params, progress=len(prompts) > 1)
        for prompt, res in zip(prompts, results):
            if out is not None or args.json:
                record = {"prompt": prompt, **msgspec.to_builtins(res)}
                line = json.dumps(record, ensure_ascii=False)
                print(line, file=out or sys.stdout)
            else:
                print(res.text)
    finally:
        if out is not None:
            out.close()
    return 0


# -------------------------------------------------------------------------- serve


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Server flags; unset ones fall back to the ``[server]`` table of ``--config``."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    g.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (default: $SLMSERVE_API_KEY)"
    )
    g.add_argument("--served-model-name", help="the model name clients send (default: demo)")
    g.add_argument("--max-waiting-requests", type=int, help="queue bound; beyond it: HTTP 429")
    g.add_argument("--max-body-bytes", type=int, help="largest request body; beyond it: 413")
    g.add_argument("--shutdown-timeout", type=float, help="seconds to drain on SIGTERM")
    g.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    g.add_argument("--access-log", action="store_true", default=None, help="log every request")
    g.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine in a child process, HTTP in this one (default; they then use two "
        "cores instead of sharing one interpreter lock)",
    )
    g.add_argument(
        "--engine-cpus",
        metavar="LIST",
        help="pin the engine process to these CPUs ('1', '2-7'; Linux), the HTTP front to the rest",
    )


def cmd_serve(args: argparse.Namespace, plugins: PluginManager) -> int:
    from slmserve.engine import AsyncEngine
    from slmserve.server.config import load_server_config, parse_cpus
    from slmserve.server.engine_process import ProcessEngine
    from slmserve.server.runner import StartupError, serve

    config = engine_config(args)
    if args.max_waiting_requests is not None:
        config = config.replace(max_waiting_requests=args.max_waiting_requests)
    server = load_server_config(
        args.config,
        {
            "host": args.host,
            "port": args.port,
            "api_key": args.api_key,
            "served_model_name": args.served_model_name,
            "max_body_bytes": args.max_body_bytes,
            "shutdown_timeout": args.shutdown_timeout,
            "access_log": args.access_log,
            "engine_cpus": args.engine_cpus,
        },
    )
    engine: AsyncEngine | ProcessEngine
    if args.engine_process:
        name = server.served_model_name or config.model or "demo"
        cpus = parse_cpus(server.engine_cpus) if server.engine_cpus else None
        engine = ProcessEngine(config, plugins=plugins, model_name=name, cpus=cpus)
        if cpus:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) - cpus)  # the front
    elif server.engine_cpus:
        raise CLIError("--engine-cpus needs the engine process (drop --no-engine-process)")
    else:
        engine = AsyncEngine(config, plugins=plugins)
    try:
        return serve(engine, server, loop=args.loop)
    except StartupError as exc:
        raise CLIError(str(exc)) from None


# -------------------------------------------------------------------------- main


def build_parser(plugins: PluginManager) -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(
        prog="slmserve", description="Serve, score and benchmark small language models."
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Callable] = {}

    p = sub.add_parser("plugins", help="list schedulers, compressors and backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    handlers["plugins"] = cmd_plugins

    p = sub.add_parser("generate", help="generate text for prompts")
    p.add_argument("prompt", nargs="*", help="prompt text")
    p.add_argument("--input", metavar="FILE.jsonl", help='one {"prompt": ...} per line')
    p.add_argument("--output", metavar="FILE.jsonl", help="write one JSON result per line")
    p.add_argument("--json", action="store_true", help="print JSON results")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--sampling-seed", type=int)
    p.add_argument("--stop", action="append")
    p.add_argument("--ignore-eos", action="store_true")
    add_engine_args(p, plugins)
    handlers["generate"] = cmd_generate
    handlers["score"] = add_score_parser(sub, plugins)
    handlers["simulate"] = add_simulate_parser(sub, plugins)
    handlers["route"] = add_route_parser(sub, plugins)
    handlers.update(add_plan_parsers(sub, plugins))
    handlers["compress"] = add_compress_parser(sub, plugins)
    handlers["prune"] = add_prune_parser(sub, plugins)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_serve_args(p)
    add_engine_args(p, plugins)
    handlers["serve"] = cmd_serve
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    try:
        plugins = PluginManager()
    except PluginError as exc:
        print(f"slmserve: plugin error: {exc}", file=sys.stderr)
        return 2
    parser, handlers = build_parser(plugins)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return handlers[args.command](args, plugins)
    except (CLIError, ConfigError, PluginError) as exc:
        print(f"slmserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
