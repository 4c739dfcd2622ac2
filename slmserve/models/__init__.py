"""Model backends: the native Llama/Qwen2/Qwen3 decoder, its loader and the demo model.

Importing this package does not import torch (the plugin module is loaded at start-up by
``slmserve plugins``); the names below are resolved lazily on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NativeBackend", "ensure_demo_model", "load_model"]

_LAZY = {
    "load_model": "slmserve.models.loader",
    "NativeBackend": "slmserve.models.loader",
    "ensure_demo_model": "slmserve.models.demo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
