"""The ``null`` backend: logits without a model, to measure the engine's own overhead.

It keeps the whole engine path real — batching, KV slot bookkeeping, the radix cache, the
scheduler, sampling over a real vocabulary, detokenization, streaming — and replaces only the
forward pass with a constant-time stand-in: the logit row of each position puts all mass on
``(input token + 1) mod vocab``, so greedy decoding counts upwards. Never use it to serve.

``device_seconds_per_token`` (and ``device_seconds_per_step``, a fixed cost per forward, as a
decode step's weight reads and launches) make it stand in for an asynchronous accelerator as
well: each forward returns at once but "occupies the device" for that long, in launch order,
and the runner's wait for a step's results sleeps until the device would be done. That is how the
overlap of host work with device work (``EngineConfig.overlap``) is measured without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmserve.hookspecs import hookimpl
from slmserve.interfaces import ForwardBatch, ModelBackend, ModelInfo
from slmserve.plugins import Registry

if TYPE_CHECKING:
    import torch

    from slmserve.cache.kv_pool import KVPool


class NullBackend(ModelBackend):
    """Constant-time fake forward pass over a real tokenizer."""

    name = "null"

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_len: int = 32768,
        device_seconds_per_token: float = 0.0,
        device_seconds_per_step: float = 0.0,
    ) -> None:
        import torch

        for name, value in [
            ("device_seconds_per_token", device_seconds_per_token),
            ("device_seconds_per_step", device_seconds_per_step),
        ]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        self.device_seconds_per_token = float(device_seconds_per_token)
        self.device_seconds_per_step = float(device_seconds_per_step)
        self._device_free_at = 0.0

        self.tokenizer = tokenizer
        vocab = len(tokenizer)
        self.info = ModelInfo(
            architecture="NullBackend",
            num_layers=1,
            hidden_size=1,
            vocab_size=vocab,
            kv_layout=[(1, 1)],
            max_position_embeddings=max_len,
            eos_token_ids=[],
            dtype="float32",
            device="cpu",
            description="no model: constant-time logits for measuring engine overhead",
            random_weights=True,
        )
        self._eye = torch.arange(vocab)

    def forward(self, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:
        if self.device_seconds_per_token or self.device_seconds_per_step:
            start = max(time.perf_counter(), self._device_free_at)
            cost = self.device_seconds_per_step
            cost += batch.input_ids.shape[0] * self.device_seconds_per_token
            self._device_free_at = start + cost
        # "Hidden state" = the input token id at each requested position.
        return batch.input_ids.index_select(0, batch.logit_indices).unsqueeze(1)

    def completion_marker(self) -> Callable[[], None]:
        """A wait for the work launched so far (the runner calls it to collect a step)."""
        done_at = self._device_free_at
        return lambda: time.sleep(max(0.0, done_at - time.perf_counter()))

    def logits(self, hidden: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        vocab = self._eye if vocab_ids is None else vocab_ids
        nxt = (hidden + 1) % self.info.vocab_size
        return (vocab.unsqueeze(0) == nxt).float()


def null_backend(
    model_path: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    **options: Any,
) -> NullBackend:
    """No model: constant-time logits, for measuring engine overhead."""
    from slmserve.models.demo import ensure_demo_model
    from slmserve.models.loader import load_tokenizer

    if device not in ("auto", "cpu"):
        raise ValueError(f"the null backend runs on the CPU only, not {device!r}")
    path = ensure_demo_model() if model_path in (None, "demo") else Path(model_path)
    return NullBackend(load_tokenizer(path), **options)


@hookimpl
def slmserve_register_backends(registry: Registry) -> None:
    registry.add("null", null_backend, description="no model: constant logits (overhead benchmark)")
