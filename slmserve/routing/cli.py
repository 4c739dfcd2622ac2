"""``slmserve route``: the routing proxy in front of running replicas.

    slmserve route --replica http://10.0.0.1:8000 --replica http://10.0.0.2:8000 \\
        --policy d2lpm --policy-opt quantum=8192 --port 8080

``add_route_parser(subparsers, plugins)`` registers the sub-command and returns its handler.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from slmserve.config import ConfigError, parse_options
from slmserve.plugins import PluginManager
from slmserve.routing.base import Router

if TYPE_CHECKING:
    from slmserve.routing.proxy import ProxyConfig

log = logging.getLogger("slmserve.router")


def add_route_parser(
    subparsers: Any, plugins: PluginManager
) -> Callable[[argparse.Namespace, PluginManager], int]:
    """Add ``route`` to ``subparsers``; return its handler."""
    p = subparsers.add_parser(
        "route",
        help="route requests over several replicas (reverse proxy)",
        description="An OpenAI-compatible reverse proxy that routes each request to a replica.",
    )
    p.add_argument(
        "--replica", action="append", required=True, metavar="URL", help="a replica (repeat)"
    )
    p.add_argument("--policy", default="d2lpm", choices=plugins.routers.names())
    p.add_argument("--policy-opt", action="append", metavar="KEY=VALUE", help="policy option")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="port (0 picks a free one)")
    p.add_argument(
        "--route-on",
        choices=["text", "tokens"],
        default=None,
        help="route on prompt text blocks, or on token ids (default: tokens with --model, "
        "else text)",
    )
    p.add_argument("--model", help="checkpoint directory whose tokenizer to route with")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between checks")
    p.add_argument(
        "--health-timeout",
        type=float,
        default=2.0,
        help="seconds a replica has to answer a health check before it leaves the rotation",
    )
    return cmd_route


def make_router(name: str, options: dict[str, Any], plugins: PluginManager) -> Router:
    factory = plugins.routers.get(name)
    try:
        return factory(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"router {name!r}: {exc}") from None


def cmd_route(args: argparse.Namespace, plugins: PluginManager) -> int:
    from slmserve.routing.proxy import ProxyConfig, create_router_app  # aiohttp, server errors

    router = make_router(args.policy, parse_options(args.policy_opt), plugins)
    for url in args.replica:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--replica must be an http(s):// URL, got {url!r}")
    if args.health_interval <= 0:
        raise ConfigError("--health-interval must be > 0")
    if args.health_timeout <= 0:
        raise ConfigError("--health-timeout must be > 0")
    tokenizer = None
    if args.model is not None:
        from slmserve.models.loader import load_tokenizer

        try:
            tokenizer = load_tokenizer(Path(args.model))
        except (OSError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
    route_on = args.route_on or ("tokens" if tokenizer is not None else "text")
    config = ProxyConfig(
        host=args.host,
        port=args.port,
        route_on=route_on,
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
    )
    try:
        app = create_router_app(router, args.replica, config, tokenizer=tokenizer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return asyncio.run(_serve(app, config, args.policy))


async def _serve(app: web.Application, config: ProxyConfig, policy: str) -> int:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        addresses = ", ".join(f"http://{a[0]}:{a[1]}" for a in runner.addresses)
        log.info("routing on %s (policy=%s, route_on=%s)", addresses, policy, config.route_on)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()
    return 0
