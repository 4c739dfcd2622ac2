#!/usr/bin/env python3
"""Mount the slmserve API inside your own aiohttp application, next to your own routes.

``create_app`` returns an ordinary ``web.Application`` that starts and stops its engine through
``cleanup_ctx``; add it as a sub-application and it shares your server, loop and lifecycle::

    python examples/embedded_app.py        # then: curl localhost:8080/llm/v1/models
"""

from __future__ import annotations

from aiohttp import web

from slmserve import Engine, EngineConfig
from slmserve.server import ServerConfig, create_app


async def index(request: web.Request) -> web.Response:
    return web.Response(text="my service; the model lives under /llm/v1/\n")


def init() -> web.Application:
    app = web.Application()
    app.router.add_get("/", index)
    llm = create_app(Engine(EngineConfig(kv_tokens=16384)), ServerConfig())
    app.add_subapp("/llm/", llm)
    return app


if __name__ == "__main__":
    web.run_app(init(), port=8080)
