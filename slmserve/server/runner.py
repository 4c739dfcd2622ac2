"""Run the application until SIGTERM/SIGINT, then drain and exit 0.

Uses aiohttp's runner API rather than ``web.run_app`` so shutdown is explicit and testable:

1. ``AppRunner.setup()`` runs the ``cleanup_ctx`` start (the engine loads its model);
2. the site starts listening and one log line says where, what and how much KV;
3. the first SIGTERM/SIGINT marks the server draining (``/ready`` -> 503) and calls
   ``AppRunner.cleanup()``: the listener closes, idle keep-alive connections close, in-flight
   requests get ``shutdown_timeout`` seconds to finish and are aborted after that, the engine
   stops. The process then exits 0.

The event loop is uvloop's when it is installed (``asyncio.Runner(loop_factory=...)``, the
non-deprecated way), plain asyncio otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from slmserve.engine import AsyncEngine
from slmserve.interfaces import PluginError
from slmserve.server.app import create_app
from slmserve.server.config import ServerConfig
from slmserve.server.engine_process import ProcessEngine
from slmserve.server.keys import SERVING

log = logging.getLogger("slmserve.server")


class StartupError(RuntimeError):
    """The server could not start (model failed to load, port taken); the message says why."""


def loop_factory(name: str = "auto") -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """``(factory, description)`` for ``asyncio.Runner``; ``auto`` prefers uvloop."""
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise
        else:
            return uvloop.new_event_loop, "uvloop"
    return None, "asyncio"


def serve(engine: AsyncEngine | ProcessEngine, config: ServerConfig, *, loop: str = "auto") -> int:
    """Serve until a signal; returns the exit status (0 after a clean drain)."""
    factory, loop_name = loop_factory(loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve_async(engine, config, loop_name=loop_name))


async def serve_async(
    engine: AsyncEngine | ProcessEngine,
    config: ServerConfig,
    *,
    loop_name: str = "asyncio",
    stop: asyncio.Event | None = None,
) -> int:
    """The async body of :func:`serve`; ``stop`` replaces the signal handlers (for embedding)."""
    app = create_app(engine, config)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that hangs up cancels its handler -> abort
        shutdown_timeout=config.shutdown_timeout + 5.0,  # the engine drains first (on_shutdown)
        access_log=log if config.access_log else None,
    )
    try:
        await runner.setup()  # starts the engine: loads the model
    except (OSError, ValueError, RuntimeError, PluginError) as exc:
        raise StartupError(f"the engine failed to start: {exc}") from exc
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
        _log_started(engine, app[SERVING].model_name, runner, loop_name)
        if stop is None:
            stop = asyncio.Event()
            _install_signal_handlers(stop, engine)
        await stop.wait()
        log.info(
            "shutting down: draining in-flight requests (up to %.0fs)", config.shutdown_timeout
        )
        app[SERVING].draining = True
    finally:
        await runner.cleanup()
    log.info("stopped")
    return 0


def _install_signal_handlers(stop: asyncio.Event, engine: AsyncEngine | ProcessEngine) -> None:
    """First signal: drain. A second one: abort whatever is still running, at once."""

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            return
        log.warning("second signal: aborting in-flight requests")
        engine.abort_all()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(on_signal))


def _log_started(
    engine: AsyncEngine | ProcessEngine, model_name: str, runner: web.AppRunner, loop: str
) -> None:
    addresses = ", ".join(_url(a) for a in runner.addresses)
    info = engine.backend.info if engine.backend is not None else None
    log.info(
        "serving %r on %s (model=%s, device=%s, dtype=%s, kv_tokens=%d, max_model_len=%d, "
        "scheduler=%s, loop=%s, engine=%s)%s",
        model_name,
        addresses,
        engine.config.model or "demo",
        info.device if info else "?",
        info.dtype if info else "?",
        engine.kv_slots,
        engine.max_model_len if engine.running else 0,
        engine.config.scheduler,
        loop,
        f"process {engine.pid}" if isinstance(engine, ProcessEngine) else "in-process",
        " - RANDOM WEIGHTS: output is meaningless" if info and info.random_weights else "",
    )


def _url(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"
    return str(address)
