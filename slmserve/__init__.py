"""slmserve: an asyncio-native serving framework for small language models.

The public Python API::

    from slmserve import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(model="path/to/checkpoint"))
    results = engine.generate_batch(["Hello"], SamplingParams(max_tokens=16))

Plugin authors use ``from slmserve import hookimpl`` and the interfaces below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slmserve.config import ConfigError, EngineConfig
from slmserve.hookspecs import hookimpl, hookspec
from slmserve.interfaces import (
    Compressor,
    ForwardBatch,
    ModelBackend,
    ModelInfo,
    PluginError,
    Scheduler,
)
from slmserve.types import (
    GenerationResult,
    RequestOutput,
    SamplingParams,
    SchedRequest,
    StepReport,
    TokenLogprob,
)

if TYPE_CHECKING:
    from slmserve.engine import AsyncEngine, Engine

__version__ = "0.1.0"

__all__ = [
    "AsyncEngine",
    "Compressor",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "ForwardBatch",
    "GenerationResult",
    "ModelBackend",
    "ModelInfo",
    "PluginError",
    "RequestOutput",
    "SamplingParams",
    "SchedRequest",
    "Scheduler",
    "StepReport",
    "TokenLogprob",
    "hookimpl",
    "hookspec",
]


def __getattr__(name: str) -> Any:
    # The engine pulls in numpy and the cache; import it on first use so that
    # ``slmserve plugins`` and plugin modules stay light.
    if name in ("Engine", "AsyncEngine"):
        from slmserve import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'slmserve' has no attribute {name!r}")
