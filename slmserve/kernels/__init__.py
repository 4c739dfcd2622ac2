"""Triton kernels for the CUDA fast path: attention over KV-pool slots and the KV store.

One module per kernel family: :mod:`~slmserve.kernels.kv_store` (write new K/V into the pool),
:mod:`~slmserve.kernels.extend` (prefill/extend attention over a ragged batch),
:mod:`~slmserve.kernels.decode` (split-K decode attention with GQA).

Importing this package does not import triton. The kernel modules do, and Triton decides at
decoration time whether a kernel is compiled for the GPU or run by its interpreter
(``TRITON_INTERPRET=1``, which runs kernels on CPU tensors for tests), so that variable must be
set before the first kernel module is imported.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["interpreter_enabled", "triton_available"]


def triton_available() -> bool:
    """Whether ``import triton`` can work here (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton kernels will run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
