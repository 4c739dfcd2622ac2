"""The engine's private state for one request."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import numpy as np

from slmserve.types import FinishReason, SamplingParams, SchedRequest, TokenLogprob

if TYPE_CHECKING:
    from slmserve.cache.radix import RadixNode


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens, KV slots and progress of one request.

    ``tokens`` is the prompt followed by the generated tokens. The KV of ``tokens[:num_computed]``
    lives at ``slots[:num_computed]``; the first ``tree_len`` of those slots belong to the radix
    tree (pinned by ``lock_node``), the rest are private to this request.

    With steps in flight (``EngineConfig.overlap``) the engine runs ahead of what it has
    collected: ``num_scheduled >= num_computed`` tokens have their KV computed or launched (the
    slots between the two are private and being written), and ``num_future`` sampled tokens are
    still on the device, not yet in ``tokens``. So the request is ``len(tokens) + num_future``
    tokens long, of which ``num_pending`` still need a step: the whole uncached prompt before
    prefill, one token while decoding (the last one sampled, even while it is on the device),
    none once that token's decode is launched.
    """

    __slots__ = (
        "_key",
        "_slot_buf",
        "apply_softmax",
        "detok",
        "eos_ids",
        "error",
        "finish_reason",
        "first_scheduled_time",
        "first_token_time",
        "label_ids",
        "lock_node",
        "logprobs",
        "num_cached_tokens",
        "num_computed",
        "num_future",
        "num_prompt",
        "num_scheduled",
        "output_ids",
        "params",
        "prompt_logprobs",
        "sched",
        "status",
        "stream",
        "tokens",
        "tree_len",
    )

    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        arrival_time: float,
        client_id: str,
        eos_ids: frozenset[int],
        detok: Any = None,
        stream: Any = None,
        label_ids: tuple[int, ...] | None = None,
        apply_softmax: bool = True,
    ) -> None:
        self.tokens: list[int] = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.params = params
        self.eos_ids = eos_ids
        self.detok = detok
        self.stream = stream
        self.label_ids = label_ids
        """Scoring request (prefill only): read these LM-head rows at the last token instead
        of sampling. An empty tuple only warms the prefix cache."""
        self.apply_softmax = apply_softmax
        self.output_ids: list[int] = []
        self.status = Status.WAITING
        self.num_computed = 0
        self.num_scheduled = 0
        self.num_future = 0
        self.tree_len = 0
        self.lock_node: RadixNode | None = None
        self._slot_buf = np.empty(max(16, len(prompt_ids) + min(params.max_tokens, 64)), np.int64)
        self._key: np.ndarray | None = None
        self.num_cached_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.error: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.sched = SchedRequest(
            rid,
            self.tokens,
            arrival_time=arrival_time,
            client_id=client_id,
            max_new_tokens=params.max_tokens,
        )

    @property
    def rid(self) -> str:
        return self.sched.rid

    @property
    def num_pending(self) -> int:
        return len(self.tokens) + self.num_future - self.num_scheduled

    @property
    def in_flight(self) -> bool:
        """Part of a launched step whose results are not collected yet."""
        return self.num_scheduled > self.num_computed

    @property
    def slots(self) -> np.ndarray:
        """Slots of the computed context (a view)."""
        return self._slot_buf[: self.num_computed]

    @property
    def scheduled_slots(self) -> np.ndarray:
        """Slots of the computed and the in-flight context (a view)."""
        return self._slot_buf[: self.num_scheduled]

    def context_slots(self, new_slots: np.ndarray, start: int) -> np.ndarray:
        """Write ``new_slots`` after the first ``start`` slots and return the whole context (a
        view)."""
        end = start + len(new_slots)
        if end > len(self._slot_buf):
            grown = np.empty(max(end, 2 * len(self._slot_buf)), np.int64)
            grown[:start] = self._slot_buf[:start]
            self._slot_buf = grown
        self._slot_buf[start:end] = new_slots
        return self._slot_buf[:end]

    def set_slots(self, slots: np.ndarray) -> None:
        """Replace the leading slots (after an insert hands back the tree's copies)."""
        self._slot_buf[: len(slots)] = slots

    def key(self, length: int | None = None) -> np.ndarray:
        """The first ``length`` (default: computed) tokens as int64, the radix tree's key type.

        The array is rebuilt only when tokens were appended since the last call, so the
        per-step prefix refresh of waiting requests does not convert lists again and again.
        """
        if self._key is None or len(self._key) != len(self.tokens):
            self._key = np.asarray(self.tokens, np.int64)
        return self._key[: self.num_computed if length is None else length]
