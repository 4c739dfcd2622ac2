"""Typed application keys (``web.AppKey``), in one module so every other module can import them.

String keys would warn (``NotAppKeyWarning``) and lose the types; keeping the keys apart from
``app.py`` avoids an import cycle between the factory and the handlers it registers.
"""

from __future__ import annotations

from aiohttp import web

from slmserve.engine import AsyncEngine
from slmserve.server.config import ServerConfig
from slmserve.server.engine_process import ProcessEngine
from slmserve.server.metrics import ChildMetrics, Metrics
from slmserve.server.serving import Serving

ENGINE = web.AppKey("slmserve_engine", AsyncEngine | ProcessEngine)
CONFIG = web.AppKey("slmserve_server_config", ServerConfig)
SERVING = web.AppKey("slmserve_serving", Serving)
METRICS = web.AppKey("slmserve_metrics", Metrics | ChildMetrics)
