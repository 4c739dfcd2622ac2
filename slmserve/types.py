"""Value types shared by the engine, the schedulers, the simulator and the server.

Everything that crosses a boundary (HTTP, config files, plugin hooks) is a ``msgspec.Struct``
so it validates and serialises the same way everywhere. The per-step scheduling views are
plain ``__slots__`` classes instead: the engine mutates them every round and they never leave
the process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
Prob = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
"""A count or token id that fits the wire (msgpack carries 64-bit integers, no more)."""
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""A signed 64-bit value (sampling hashes the seed's 64 bits)."""

DEFAULT_CLIENT = "default"

FinishReason = Literal["stop", "length", "abort", "error"]


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How tokens are chosen for one request (OpenAI / vLLM semantics)."""

    max_tokens: Count = 16
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=2**63 - 1)] = -1
    """``-1`` (or 0) disables top-k."""
    min_p: Prob = 0.0
    seed: Seed | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[Count] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    """Number of top log-probabilities to return per sampled token (``None``: none)."""
    prompt_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    """Number of top log-probabilities to return per prompt token (``None``: none)."""
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def check(self) -> SamplingParams:
        """These parameters, once their types and bounds are checked: a ``SamplingParams``
        built in Python skips the checks decoding does, and a bad value (``top_p=0``, a seed
        beyond 64 bits) would otherwise fail the whole batch step it lands in. Raises
        ``ValueError`` naming the field."""
        try:
            msgspec.convert(msgspec.to_builtins(self), SamplingParams)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid sampling parameters: {exc}") from None
        return self


class TokenLogprob(msgspec.Struct, array_like=True):
    """One token's log-probability and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = msgspec.field(default_factory=list)


class RequestOutput(msgspec.Struct, kw_only=True):
    """One increment of a request's output, as pushed to its stream.

    ``new_token_ids``/``new_text`` hold what was produced since the previous output;
    ``finish_reason`` is set on the last one.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    scores: list[float] | None = None
    """Scoring requests: one value per label token (probabilities, or log-probabilities)."""
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedRequest:
    """What a scheduler may read about one request (treat it as read-only).

    The engine (or the simulator) owns the object and refreshes ``matched_len`` against the
    current radix cache before every ``Scheduler.order`` call; ``num_computed`` and
    ``num_output`` grow as the request runs. ``tokens`` is the prompt followed by the tokens
    generated so far (what a preempted request must recompute), so ``prompt_len`` grows while
    a request decodes; policies that need the original prompt length record it in
    ``on_arrival``. Schedulers that look at prefixes (in-batch de-duplication) read
    ``tokens`` and must not mutate it.
    """

    __slots__ = (
        "arrival_time",
        "client_id",
        "matched_len",
        "max_new_tokens",
        "num_computed",
        "num_output",
        "rid",
        "tokens",
    )

    def __init__(
        self,
        rid: str,
        tokens: Sequence[int],
        *,
        arrival_time: float,
        client_id: str = DEFAULT_CLIENT,
        max_new_tokens: int = 16,
    ) -> None:
        self.rid = rid
        self.tokens = tokens
        self.arrival_time = arrival_time
        self.client_id = client_id
        self.max_new_tokens = max_new_tokens
        self.matched_len = 0
        self.num_computed = 0
        self.num_output = 0

    @property
    def prompt_len(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"SchedRequest({self.rid!r}, client={self.client_id!r}, len={self.prompt_len}, "
            f"matched={self.matched_len}, arrival={self.arrival_time:.6f})"
        )


class StepReport(msgspec.Struct, kw_only=True):
    """What happened in one engine step, told to the scheduler afterwards.

    ``computed`` maps request id -> (client id, prompt tokens computed this step, output
    tokens produced this step); prompt tokens are the *uncached* ones actually run through
    the model, so service-accounting policies charge real work, per step.
    """

    now: float
    admitted: list[str] = msgspec.field(default_factory=list)
    computed: dict[str, tuple[str, int, int]] = msgspec.field(default_factory=dict)
    finished: list[str] = msgspec.field(default_factory=list)
    preempted: list[str] = msgspec.field(default_factory=list)


class GenerationResult(msgspec.Struct, kw_only=True):
    """The whole output of one finished request (what ``Engine.generate_batch`` returns)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


class ScoreResult(msgspec.Struct, kw_only=True):
    """Relevance scores of many items against one query (``AsyncEngine.score``)."""

    scores: list[list[float]]
    """Per item, one value per label token: probabilities over the labels (softmax) or the
    labels' log-probabilities under the whole vocabulary."""
    prompt_tokens: int
    cached_tokens: int
