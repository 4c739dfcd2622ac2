"""Shared fixtures. Tiny random checkpoints are built once per session (see checkpoints.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from checkpoints import build_checkpoint


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama: llama3 rope scaling, untied LM head."""
    return build_checkpoint("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2: q/k/v biases, sharded safetensors."""
    return build_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3: q/k norms, tied embeddings, head_dim from config."""
    return build_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="session")
def demo_backend() -> Any:
    """The demo model, loaded once; tests build their own engines (own KV) around it."""
    from slmserve.plugins import PluginManager

    return PluginManager(load_entrypoints=False).backends.get("native")(
        None, device="cpu", dtype="float32"
    )
