"""The HTTP server: an OpenAI-compatible API, probes and Prometheus metrics over aiohttp.

``create_app(engine, config)`` builds the application; ``slmserve serve`` runs it (see
:mod:`slmserve.server.runner`).
"""

from __future__ import annotations

from slmserve.server.app import create_app
from slmserve.server.config import ServerConfig, load_server_config

__all__ = ["ServerConfig", "create_app", "load_server_config"]
