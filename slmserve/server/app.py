"""The application factory: routes, middlewares, the engine's lifecycle, plugin routes.

``create_app(engine, config)`` is a pure factory that the CLI, the tests and embedders all call.
The application owns the engine's lifecycle: a ``cleanup_ctx`` starts it (loading the model)
before the first request and stops it last; ``on_shutdown`` — which aiohttp runs after the
listener has closed but before it waits for running handlers — marks the server as draining
and lets in-flight requests finish within ``shutdown_timeout``, aborting the rest, so handlers
end on their own instead of being cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from slmserve.engine import AsyncEngine
from slmserve.server import openai, score
from slmserve.server.auth import api_key_middleware
from slmserve.server.config import ServerConfig
from slmserve.server.engine_process import ProcessEngine
from slmserve.server.errors import APIError, error_middleware
from slmserve.server.keys import CONFIG, ENGINE, METRICS, SERVING
from slmserve.server.metrics import metrics_for
from slmserve.server.openai import json_response
from slmserve.server.protocol import Status
from slmserve.server.serving import Serving


def create_app(
    engine: AsyncEngine | ProcessEngine, config: ServerConfig | None = None
) -> web.Application:
    """Build the HTTP application around ``engine`` (started and stopped by the app): an
    :class:`AsyncEngine` in this process, or a :class:`ProcessEngine` running it in a child."""
    config = config or ServerConfig()
    middlewares = [error_middleware]
    if config.api_key:
        middlewares.append(api_key_middleware(config.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    serving = Serving(engine, config)
    app[ENGINE] = engine
    app[CONFIG] = config
    app[SERVING] = serving
    app[METRICS] = metrics_for(engine, serving.model_name)
    setup_routes(app)
    app.cleanup_ctx.append(engine_lifecycle)
    app.on_shutdown.append(drain)
    engine.plugins.hook.slmserve_add_routes(app=app, engine=engine)
    return app


def setup_routes(app: web.Application) -> None:
    # Named: the API-key check leaves these three open by name (see ``auth.OPEN_ROUTES``).
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/ready", ready, name="ready")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/v1/models", openai.list_models)
    app.router.add_get("/v1/models/{model}", openai.retrieve_model)
    app.router.add_post("/v1/completions", openai.create_completion)
    app.router.add_post("/v1/chat/completions", openai.create_chat_completion)
    app.router.add_post("/v1/score", score.create_score)
    app.router.add_post("/tokenize", openai.tokenize)
    app.router.add_post("/detokenize", openai.detokenize)


async def engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start the engine (and the metrics hook) before serving; stop both at cleanup."""
    engine = app[ENGINE]
    await engine.start()
    app[METRICS].attach()
    try:
        yield
    finally:
        await engine.shutdown(app[CONFIG].shutdown_timeout)
        app[METRICS].detach()


async def drain(app: web.Application) -> None:
    """First step of shutdown: not ready any more, finish or abort in-flight requests."""
    app[SERVING].draining = True
    await app[ENGINE].shutdown(app[CONFIG].shutdown_timeout)


# ------------------------------------------------------------------------------ probes


async def health(request: web.Request) -> web.Response:
    """``GET /health``: liveness — the event loop answers and the engine has not died."""
    serving = request.app[SERVING]
    if not (serving.draining or serving.engine.running):
        raise APIError(503, "the engine is not running", code="engine_dead")
    return json_response(Status(status="ok"))


async def ready(request: web.Request) -> web.Response:
    """``GET /ready``: readiness — 503 from the moment shutdown begins."""
    serving = request.app[SERVING]
    if serving.draining or not serving.engine.running:
        raise APIError(503, "not ready: the server is shutting down", code="shutting_down")
    return json_response(Status(status="ready"))


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    body = await request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
