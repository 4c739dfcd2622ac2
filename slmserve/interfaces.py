"""The interfaces plugin authors implement: schedulers, compressors and model backends.

Each class states its contract: when the engine calls a method, what the method may mutate,
and what it may raise. Built-ins subclass these exactly like third-party plugins do, and are
registered through the hooks in :mod:`slmserve.hookspecs`.

Nothing here imports torch at module import time, so ``slmserve plugins`` and the pure-Python
core (schedulers, cache bookkeeping, simulator) stay fast to start.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

if TYPE_CHECKING:
    import torch

    from slmserve.cache.kv_pool import KVPool
    from slmserve.types import SchedRequest, StepReport


class PluginError(Exception):
    """A plugin could not be found, was registered twice, or was configured wrongly."""


# --------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------


class Scheduler(ABC):
    """Decides the admission order of waiting requests.

    Contract:

    * ``order`` is called once per engine step with every waiting request. Before the call the
      engine refreshes each request's ``matched_len`` against the *current* radix cache. It
      returns the requests in the order the engine should try to admit them; the engine admits
      in that order and **stops at the first request that does not fit** (token budget or KV
      memory), so the policy's order is respected. Returning a subset is allowed: requests left
      out simply wait. It must not mutate the requests and should be O(n log n) or better.
    * ``on_arrival`` is called once when a request enters the waiting queue (also when a
      preempted request comes back, with the same ``SchedRequest`` object).
    * ``on_admit`` is called when a step is planned, with the ids it admitted (in the order
      given). Policies whose next order depends on the last admissions (k-LPM's cycle) update
      here: with overlapped steps the next step is planned before this one is reported.
    * ``on_step`` is called after every step with what was admitted, how many tokens each
      running request computed, and what finished, was aborted or preempted. Service-accounting
      policies (VTC, DLPM) charge here, per step (with overlapped steps, a step or two after
      the steps they planned).
    * The same object runs inside the simulator, with simulated time in ``now``.
    * Raising from any method is a bug in the policy, and the engine keeps serving: a raising
      ``order`` fails the waiting requests it was given, with the error; a raising
      ``on_arrival`` refuses the request being submitted (``RuntimeError``); a raising
      ``on_admit`` or ``on_step`` is logged.
    """

    name: ClassVar[str]
    """Registry name (``--scheduler NAME``)."""

    uses_prefix_match: ClassVar[bool] = True
    """Whether ``order`` reads ``matched_len``. Policies that do not (FCFS, VTC) set it to
    ``False`` and the engine skips matching the whole waiting queue every round."""

    def on_arrival(self, request: SchedRequest, now: float) -> None:  # noqa: B027
        """A request joined the waiting queue. Default: nothing."""

    @abstractmethod
    def order(self, waiting: Sequence[SchedRequest], now: float) -> list[SchedRequest]:
        """Return waiting requests in admission order (a permutation or a subset)."""

    def on_admit(self, admitted: Sequence[str], now: float) -> None:  # noqa: B027
        """A step was planned that admits these requests. Default: nothing."""

    def on_step(self, report: StepReport) -> None:  # noqa: B027
        """Account for one finished step. Default: nothing."""

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        """Per-client counters for ``/metrics``: ``{series_name: {client_id: value}}``."""
        return {}


class SchedulerFactory:
    """Documentation-only: a scheduler factory is ``factory(**options) -> Scheduler``.

    Options come from ``--scheduler-opt KEY=VALUE`` or ``[scheduler_options]`` in TOML; an
    unknown or ill-typed option must raise ``TypeError``/``ValueError`` naming it.
    """


# --------------------------------------------------------------------------------------------
# Compressors
# --------------------------------------------------------------------------------------------


class Compressor(ABC):
    """Shortens the text of a scoring item before tokenization.

    Contract: ``compress`` is pure (no shared mutable state) and may be called from a worker
    thread, concurrently for different items. It returns text (possibly unchanged). It may read
    ``query`` (query-aware compressors) and use ``tokenizer`` to count tokens. It raises
    ``ValueError`` for invalid options, at construction time where possible.

    Callers hand a whole request's items to ``compress_many``; the default loops over
    ``compress``, and a compressor with a per-call overhead (a model, a cache lookup) overrides
    it to do one batch. A compressor that sets ``runs_model`` may take seconds: callers must run
    it off the event loop, whatever the number of items.
    """

    name: ClassVar[str]

    runs_model: ClassVar[bool] = False
    """True when compressing may run a model (never call it on an event loop)."""

    @abstractmethod
    def compress(self, item: str, *, query: str, tokenizer: Any) -> str:
        """Return the compressed item text."""

    def compress_many(self, items: Sequence[str], *, query: str, tokenizer: Any) -> list[str]:
        """Compress every item (same order); override to batch the work."""
        return [self.compress(item, query=query, tokenizer=tokenizer) for item in items]


# --------------------------------------------------------------------------------------------
# Model backends
# --------------------------------------------------------------------------------------------


class ModelInfo(msgspec.Struct, kw_only=True, frozen=True):
    """What the engine needs to know about a loaded model."""

    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    kv_layout: list[tuple[int, int]]
    """Per layer: (number of KV heads, head dim). Layers may differ (pruned models)."""
    max_position_embeddings: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    description: str = ""
    random_weights: bool = False


@dataclass(slots=True)
class ForwardBatch:
    """One ragged step: new tokens of many sequences, flattened.

    All tensors live on the model's device. For sequence ``i`` the new tokens are
    ``input_ids[cu_new[i]:cu_new[i+1]]`` at ``positions`` (absolute positions in the sequence);
    their K/V go to ``out_slots`` (same indexing). The whole context of sequence ``i``
    (cached prefix followed by the new tokens, in order) lives at
    ``context_slots[cu_ctx[i]:cu_ctx[i+1]]``. Attention is causal: new token ``j`` of sequence
    ``i`` sees context entries ``[0, ctx_len_i - new_len_i + j]``.

    ``logit_indices`` are indices into the flat new tokens where hidden states are wanted (the
    last token of a sequence that samples or scores; nothing for a non-final prefill chunk).
    ``max_new``/``max_ctx`` are host-side ints so backends can size buffers without a sync.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_slots: torch.Tensor  # [T] int64
    cu_new: torch.Tensor  # [B+1] int64
    context_slots: torch.Tensor  # [sum ctx] int64
    cu_ctx: torch.Tensor  # [B+1] int64
    logit_indices: torch.Tensor  # [L] int64
    new_lens: list[int]
    ctx_lens: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.new_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class ModelBackend(ABC):
    """Turns a checkpoint into a forward pass over the KV pool.

    Contract:

    * The factory ``factory(model_path, *, device, dtype, **options) -> ModelBackend`` loads
      weights and the tokenizer; it raises ``PluginError``/``ValueError`` with a clear message
      for an unsupported checkpoint (naming what is supported).
    * ``forward`` runs in the engine's single worker thread, never concurrently with itself. It
      writes the K/V of every new token into ``kv`` at ``batch.out_slots`` and must not touch
      other slots. It returns hidden states at ``batch.logit_indices`` only: ``[L, hidden]``.
    * ``logits`` maps those hidden states to float32 logits, either over the whole vocabulary
      or, when ``vocab_ids`` is given, only for those rows of the LM head (scoring reads two).
    * Both may return before the device has finished (CUDA work is queued): the runner waits
      for a step's results once, on a CUDA event, and may launch the next step first. A
      backend whose device is not a CUDA stream can define ``completion_marker() -> wait``:
      called after a step is launched, it returns a function that blocks until that step's
      work is done (the ``null`` backend's simulated device does this).
    """

    name: ClassVar[str]
    info: ModelInfo
    tokenizer: Any

    @abstractmethod
    def forward(self, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:
        """Run the model on one ragged batch; return hidden states at ``logit_indices``."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Project hidden states to float32 logits (optionally only ``vocab_ids`` rows)."""
