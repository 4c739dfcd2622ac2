"""``POST /v1/score``: relevance scores of many items against one query (SGLang's wire format).

The handler validates everything it can before the engine sees the request — item count, item
length (naming the offending index), labels, compressors — so a bad request is a 400 and never
queues work. Compression (optional, chainable) runs in a worker thread: it is CPU-bound string
work that would otherwise stall the event loop for every other client. The engine then scores
all items in one go, sharing the query prefix through the radix cache (``cached_tokens``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from slmserve.compressors import count_tokens, run_chain
from slmserve.engine import EngineClosedError, QueueFullError
from slmserve.interfaces import Compressor, PluginError
from slmserve.server.config import ServerConfig
from slmserve.server.errors import APIError
from slmserve.server.keys import CONFIG, SERVING
from slmserve.server.openai import generation_error, json_response
from slmserve.server.protocol import (
    SCORE_DECODER,
    CompressorSpec,
    PromptTokensDetails,
    ScoreRequest,
    ScoreResponse,
    ScoreUsage,
)
from slmserve.server.serving import Serving, client_id

Item = str | list[int]

_ITEM_INDEX = re.compile(r"\bitem (\d+)\b")
_THREAD_MIN_ITEMS = 8
"""Below this many items compression runs inline: a thread hop costs more than the work (a
compressor that runs a model always goes to the thread)."""


async def create_score(request: web.Request) -> web.Response:
    """``POST /v1/score``."""
    serving = request.app[SERVING]
    config = request.app[CONFIG]
    req = SCORE_DECODER.decode(await request.read())
    serving.check_model(req.model)
    items = _items(req, config)
    labels = label_ids(serving, req)
    specs = _specs(req, config)
    compressors = build_compressors(serving, specs)
    query = req.query
    ratio = 1.0
    lengths: list[int] | None = None
    if compressors:
        if not isinstance(query, str):
            raise APIError(400, "compressors need text query and items", param="compressor")
        texts = [x for x in items if isinstance(x, str)]
        if len(texts) < _THREAD_MIN_ITEMS and not any(c.runs_model for c in compressors):
            items, lengths, ratio = compress_items(compressors, query, texts, serving.tokenizer)
        else:
            items, lengths, ratio = await asyncio.to_thread(
                compress_items, compressors, query, texts, serving.tokenizer
            )
    _check_item_tokens(serving, config, items, lengths)
    template = req.template if req.template is not None else config.score_template
    try:
        result = await serving.engine.score(
            query,
            items,
            label_token_ids=labels,
            apply_softmax=req.apply_softmax,
            item_first=req.item_first,
            template=template,
            client_id=client_id(request, req.user),
        )
    except ValueError as exc:
        raise APIError(400, str(exc), param=_param_of(str(exc))) from None
    except (QueueFullError, EngineClosedError):
        raise  # 429 / 503 through the error middleware
    except RuntimeError as exc:
        raise generation_error(str(exc)) from None
    return json_response(
        ScoreResponse(
            model=serving.model_name,
            scores=result.scores,
            usage=ScoreUsage(
                prompt_tokens=result.prompt_tokens,
                cached_tokens=result.cached_tokens,
                total_tokens=result.prompt_tokens,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens),
                compression_ratio=ratio,
            ),
        )
    )


# ------------------------------------------------------------------------------ validation


def _items(req: ScoreRequest, config: ServerConfig) -> list[Item]:
    """The items as a list, bounded in count and (text) length, none empty."""
    items: list[Item] = [req.items] if isinstance(req.items, str) else list(req.items)
    if not items:
        raise APIError(400, "`items` is empty: give at least one item to score", param="items")
    if len(items) > config.max_score_items:
        raise APIError(
            400,
            f"`items` has {len(items)} entries; the limit is {config.max_score_items} per request",
            param="items",
        )
    text_query = isinstance(req.query, str)
    for i, item in enumerate(items):
        if isinstance(item, str) != text_query:
            raise APIError(
                400,
                f"item {i}: query and items must both be text or both be token ids",
                param=f"items[{i}]",
            )
        if not item:
            raise APIError(400, f"item {i} is empty", param=f"items[{i}]")
        if isinstance(item, str) and len(item) > config.max_score_item_chars:
            raise APIError(
                400,
                f"item {i} has {len(item)} characters; the limit is {config.max_score_item_chars}",
                param=f"items[{i}]",
            )
    if not req.query:
        raise APIError(400, "`query` is empty", param="query")
    return items


def label_ids(serving: Serving, req: ScoreRequest) -> list[int]:
    """``label_token_ids`` as given, or each of ``labels`` tokenized to exactly one token."""
    if req.labels is not None and req.label_token_ids is not None:
        raise APIError(400, "give one of `labels` and `label_token_ids`, not both", param="labels")
    if req.labels is not None:
        if not req.labels:
            raise APIError(400, "`labels` is empty", param="labels")
        out = []
        for i, label in enumerate(req.labels):
            ids = serving.encode(label, False)
            if len(ids) != 1:
                raise APIError(
                    400,
                    f"label {label!r} is {len(ids)} tokens for this model's tokenizer; each "
                    f"label must be exactly one token (or send `label_token_ids`)",
                    param=f"labels[{i}]",
                )
            out.append(ids[0])
        return out
    if req.label_token_ids is None:
        raise APIError(
            400, "give the labels to read: `label_token_ids` or `labels`", param="label_token_ids"
        )
    return serving.check_ids(req.label_token_ids, "label_token_ids")


def _check_item_tokens(
    serving: Serving, config: ServerConfig, items: list[Item], lengths: list[int] | None
) -> None:
    """400 naming the first item over ``max_score_item_tokens`` (when that limit is set)."""
    limit = config.max_score_item_tokens
    if limit is None:
        return
    if lengths is None:
        lengths = [
            len(x) if isinstance(x, list) else count_tokens(serving.tokenizer, x) for x in items
        ]
    for i, n in enumerate(lengths):
        if n > limit:
            raise APIError(
                400,
                f"item {i} has {n} tokens; the limit is {limit} per item",
                param=f"items[{i}]",
            )


def _param_of(message: str) -> str | None:
    match = _ITEM_INDEX.search(message)
    if match:
        return f"items[{match.group(1)}]"
    for param in ("label_token_ids", "query"):
        if param in message:
            return param
    return None


# ------------------------------------------------------------------------------ compression


def _specs(req: ScoreRequest, config: ServerConfig) -> list[CompressorSpec]:
    if req.compressor is None:
        return [
            CompressorSpec(name=c.get("name", ""), options=dict(c.get("options", {})))
            for c in config.score_compressors
        ]
    return [req.compressor] if isinstance(req.compressor, CompressorSpec) else req.compressor


def build_compressors(serving: Serving, specs: Sequence[CompressorSpec]) -> list[Compressor]:
    """Instantiate the chain; an unknown name (400 listing the valid ones) or a bad option
    (400 naming it) fails here, before any work is queued."""
    registry = serving.engine.plugins.compressors
    out = []
    for i, spec in enumerate(specs):
        param = f"compressor[{i}]" if len(specs) > 1 else "compressor"
        try:
            factory = registry.get(spec.name)
        except PluginError as exc:
            raise APIError(400, str(exc), param=param) from None
        try:
            out.append(factory(**spec.options))
        except (TypeError, ValueError) as exc:
            raise APIError(400, f"compressor {spec.name!r}: {exc}", param=param) from None
    return out


def compress_items(
    compressors: Sequence[Compressor], query: str, items: Sequence[str], tokenizer: Any
) -> tuple[list[Item], list[int], float]:
    """Run the chain over every item: (compressed items, their token counts, the ratio of
    item tokens before to after). A compressor that empties an item is a 400 naming it."""
    texts = run_chain(compressors, items, query, tokenizer)
    before = after = 0
    out: list[Item] = []
    lengths = []
    for i, (item, text) in enumerate(zip(items, texts)):
        if not text:
            raise APIError(400, f"item {i} is empty after compression", param=f"items[{i}]")
        n = count_tokens(tokenizer, text)
        before += count_tokens(tokenizer, item)
        after += n
        out.append(text)
        lengths.append(n)
    return out, lengths, before / after if after else 1.0
