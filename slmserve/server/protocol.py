"""The OpenAI wire format as msgspec Structs: every request and response body the server speaks.

Requests ignore unknown fields (OpenAI clients send many optional ones we do not implement) but
validate the fields they know, with bounds in ``msgspec.Meta``; so a bad value fails while the
body is decoded, with a message that names the field (``... - at `$.temperature```).
Responses are plain Structs encoded by one shared :data:`ENCODER`.

Decoders and the encoder are built once per type, at import: reusing them is the fast path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from slmserve.types import Count, Seed

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
StopString = Annotated[str, msgspec.Meta(min_length=1)]


class _Request(msgspec.Struct, kw_only=True):
    """Base of request bodies: keyword-only, unknown fields ignored."""


class StreamOptions(_Request, kw_only=True):
    include_usage: bool = False
    """Send one last chunk (with empty ``choices``) that carries the request's ``usage``."""


class SamplingFields(_Request, kw_only=True):
    """Sampling fields shared by completions and chat (OpenAI names, plus vLLM extensions)."""

    model: str | None = None
    """Optional here; when given it must be the served model name (else 404)."""
    max_tokens: NonNegInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=2**63 - 1)] = -1
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    n: PosInt = 1
    stop: StopString | list[StopString] | None = None
    stop_token_ids: list[Count] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    user: str | None = None
    """Client id for fair schedulers (the ``X-Client-Id`` header takes precedence)."""
    logit_bias: dict[str, float] | None = None
    """Not supported; a non-empty value is rejected rather than silently ignored."""


class CompletionRequest(SamplingFields, kw_only=True):
    """``POST /v1/completions``."""

    prompt: str | list[str | int | list[int]]
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    logprobs: TopLogprobs | None = None
    echo: bool = False
    best_of: PosInt | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


class ContentPart(_Request, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(_Request, kw_only=True):
    role: Annotated[str, msgspec.Meta(min_length=1)]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: NonNegInt | None = None
    """Preferred over the deprecated ``max_tokens`` when both are given."""
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Request, kw_only=True):
    """``POST /tokenize``: exactly one of ``prompt`` and ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request, kw_only=True):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


# ------------------------------------------------------------------------------ responses


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    """The legacy completions logprobs object (parallel lists, one entry per token)."""

    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(msgspec.Struct, kw_only=True):
    """A whole completion, or (``object`` unchanged, as OpenAI does) one streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A streamed message increment; unset fields are left out (the last delta is ``{}``)."""

    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    """One entry of ``GET /v1/models``; ``random_weights`` says plainly when output is noise."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slmserve"
    root: str
    max_model_len: int
    description: str
    random_weights: bool


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str


class Status(msgspec.Struct, kw_only=True):
    """``/health`` and ``/ready`` bodies."""

    status: str


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


ENCODER = msgspec.json.Encoder()
"""Encodes every response Struct (one instance: reuse is the fast path)."""

COMPLETION_DECODER = msgspec.json.Decoder(CompletionRequest)
CHAT_DECODER = msgspec.json.Decoder(ChatCompletionRequest)
TOKENIZE_DECODER = msgspec.json.Decoder(TokenizeRequest)
DETOKENIZE_DECODER = msgspec.json.Decoder(DetokenizeRequest)


# ------------------------------------------------------------------------------ scoring


class CompressorSpec(_Request, kw_only=True, forbid_unknown_fields=True):
    """One compressor of a ``/v1/score`` request: a registered name and its options."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class ScoreRequest(_Request, kw_only=True):
    """``POST /v1/score``, wire-compatible with SGLang's, plus ``labels``, ``template`` and
    ``compressor``. Query and items are both text or both token ids."""

    model: str | None = None
    query: str | list[int]
    items: str | list[str | list[int]]
    """One text, a list of texts, or a list of token-id lists."""
    label_token_ids: list[int] | None = None
    labels: list[str] | None = None
    """Label texts, each of which must be exactly one token (instead of ``label_token_ids``)."""
    apply_softmax: bool = True
    item_first: bool = False
    template: str | None = None
    compressor: CompressorSpec | list[CompressorSpec] | None = None
    """One compressor or a chain, applied in order; ``[]`` turns the server default off."""
    user: str | None = None


class ScoreUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    cached_tokens: int
    """Prompt tokens read from the prefix cache (the shared query), summed over items."""
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    compression_ratio: float
    """Item tokens before compression / after (1.0 without a compressor)."""


class ScoreResponse(msgspec.Struct, kw_only=True):
    object: Literal["scoring"] = "scoring"
    model: str
    scores: list[list[float]]
    """Per item (request order), one value per label: probabilities with ``apply_softmax``,
    else the label tokens' log-probabilities."""
    usage: ScoreUsage


SCORE_DECODER = msgspec.json.Decoder(ScoreRequest)
