"""The built-in ``native`` backend plugin: the torch decoder in :mod:`slmserve.models.decoder`.

This module must stay cheap to import (``slmserve plugins`` loads it): torch and the loader are
imported inside the factory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmserve.hookspecs import hookimpl
from slmserve.plugins import Registry

if TYPE_CHECKING:
    from slmserve.models.loader import NativeBackend

DEMO_NAMES = (None, "demo")


def native_backend(
    model_path: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "auto",
    **options: Any,
) -> NativeBackend:
    """Native torch decoder (Llama, Qwen2, Qwen3); ``model_path`` None or "demo" is the demo.

    Option ``attention``: ``"auto"`` (Triton kernels on CUDA, torch elsewhere), ``"torch"`` or
    ``"triton"``.
    """
    if options:
        raise TypeError(f"unknown native backend options: {', '.join(sorted(options))}")
    from slmserve.models.loader import load_model

    if model_path in DEMO_NAMES:
        from slmserve.models.demo import ensure_demo_model

        model_path = ensure_demo_model()
    return load_model(model_path, device=device, dtype=dtype, attention=attention)


@hookimpl
def slmserve_register_backends(registry: Registry) -> None:
    registry.add(
        "native",
        native_backend,
        description="native torch decoder for Llama, Qwen2 and Qwen3 checkpoints",
    )
