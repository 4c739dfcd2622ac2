"""OpenAI-compatible handlers: completions, chat completions, models, tokenize, detokenize.

Every handler has the same shape: decode and validate the body (a msgspec Decoder per type),
prepare prompts and limits through :class:`~slmserve.server.serving.Serving`, submit one engine
request per choice, then either collect the results or stream them as Server-Sent Events.
Whatever happens after submission — the client disconnects, the handler is cancelled, a write
fails — the ``finally`` aborts the engine requests still running, which frees their KV.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import aclosing

import msgspec
from aiohttp import web

from slmserve.engine import RequestStream, collect
from slmserve.server import sse
from slmserve.server.errors import APIError, error_body
from slmserve.server.keys import SERVING
from slmserve.server.logprobs import (
    add_completion_logprobs,
    chat_logprobs,
    prompt_entries,
    sampled_entries,
)
from slmserve.server.protocol import (
    CHAT_DECODER,
    COMPLETION_DECODER,
    DETOKENIZE_DECODER,
    ENCODER,
    TOKENIZE_DECODER,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeResponse,
    Usage,
)
from slmserve.server.serving import (
    Prompt,
    Serving,
    client_id,
    merged,
    new_id,
    reject_unsupported,
    sampling_params,
)
from slmserve.types import GenerationResult, RequestOutput

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default for ``/v1/completions``; chat defaults to the rest of the context."""


def json_response(body: msgspec.Struct) -> web.Response:
    return web.Response(body=ENCODER.encode(body), content_type="application/json")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def generation_error(message: str | None) -> APIError:
    """A request the engine failed (a backend error): the server's fault, not the client's."""
    return APIError(500, f"generation failed: {message or 'unknown error'}", type="internal_error")


async def collect_all(streams: Sequence[RequestStream]) -> list[GenerationResult]:
    """Whole results of every stream (no task for the common single-stream case)."""
    if len(streams) == 1:
        return [await collect(streams[0])]
    return list(await asyncio.gather(*(collect(s) for s in streams)))


def check_results(results: Sequence[GenerationResult]) -> None:
    for result in results:
        if result.finish_reason == "error":
            raise generation_error(result.error)


# ------------------------------------------------------------------------------ completions


async def create_completion(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    serving = request.app[SERVING]
    req = COMPLETION_DECODER.decode(await request.read())
    serving.check_model(req.model)
    reject_unsupported(req)
    if req.suffix:
        raise APIError(400, "`suffix` is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "`best_of` is not supported (other than best_of == n)", param="best_of")
    prompts = serving.completion_prompts(req.prompt, req.add_special_tokens)
    serving.check_choices(len(prompts) * req.n)
    # echo + logprobs: score the prompt too, so a client can compute log-likelihoods.
    prompt_logprobs = req.logprobs if req.echo else None
    choices: list[Prompt] = []
    params = []
    for prompt in prompts:
        max_tokens = serving.max_tokens(
            len(prompt.ids), req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS
        )
        for j in range(req.n):
            choices.append(prompt)
            params.append(
                sampling_params(
                    req,
                    max_tokens,
                    logprobs=req.logprobs,
                    prompt_logprobs=prompt_logprobs,
                    choice=j,
                )
            )
    rid = new_id("cmpl")
    streams = serving.submit(rid, choices, params, client_id(request, req.user))
    try:
        if req.stream:
            return await _stream_completion(request, serving, rid, req, choices, streams)
        results = await collect_all(streams)
    finally:
        serving.abort_unfinished(streams)
    check_results(results)
    return json_response(_completion(serving, rid, req, choices, results))


def _echo_text(serving: Serving, prompt: Prompt) -> str:
    return prompt.text if prompt.text is not None else serving.tokenizer.decode(prompt.ids)


def _completion(
    serving: Serving,
    rid: str,
    req: CompletionRequest,
    choices: list[Prompt],
    results: Sequence[GenerationResult],
) -> CompletionResponse:
    out = []
    for index, (prompt, result) in enumerate(zip(choices, results)):
        logprobs = None
        if req.logprobs is not None:
            logprobs = CompletionLogprobs()
            offset = 0
            if req.echo:
                entries = prompt_entries(prompt.ids, result.prompt_logprobs)
                offset = add_completion_logprobs(serving, logprobs, entries, offset)
            add_completion_logprobs(serving, logprobs, sampled_entries(result.logprobs), offset)
        text = _echo_text(serving, prompt) + result.text if req.echo else result.text
        out.append(
            CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=result.finish_reason
            )
        )
    # Each prompt counts once, however many choices (n) it has; choice 0 stands for it.
    heads = range(0, len(choices), req.n)
    return CompletionResponse(
        id=rid,
        created=int(time.time()),
        model=serving.model_name,
        choices=out,
        usage=usage(
            sum(len(choices[i].ids) for i in heads),
            sum(len(r.token_ids) for r in results),
            sum(results[i].num_cached_tokens for i in heads),
        ),
    )


async def _stream_completion(
    request: web.Request,
    serving: Serving,
    rid: str,
    req: CompletionRequest,
    choices: list[Prompt],
    streams: list[RequestStream],
) -> web.StreamResponse:
    created = int(time.time())
    response = await sse.open_stream(request)
    offsets = [0] * len(streams)
    started = [False] * len(streams)
    cached = [0] * len(streams)
    completion_tokens = 0
    try:
        async with aclosing(merged(streams)) as outputs:
            async for i, out in outputs:
                if out.finish_reason == "error":
                    await sse.send(response, error_body(generation_error(out.error)))
                    break
                completion_tokens += len(out.new_token_ids)
                cached[i] = out.num_cached_tokens
                text = out.new_text
                logprobs = CompletionLogprobs() if req.logprobs is not None else None
                if not started[i]:
                    started[i] = True
                    if req.echo:
                        if logprobs is not None:
                            entries = prompt_entries(choices[i].ids, out.prompt_logprobs)
                            offsets[i] = add_completion_logprobs(
                                serving, logprobs, entries, offsets[i]
                            )
                        text = _echo_text(serving, choices[i]) + text
                if logprobs is not None:
                    offsets[i] = add_completion_logprobs(
                        serving, logprobs, sampled_entries(out.logprobs), offsets[i]
                    )
                    if not logprobs.tokens:
                        logprobs = None
                if not text and logprobs is None and not out.finished:
                    continue  # held-back text (partial UTF-8, a possible stop string)
                choice = CompletionChoice(
                    index=i, text=text, logprobs=logprobs, finish_reason=out.finish_reason
                )
                chunk = CompletionResponse(
                    id=rid, created=created, model=serving.model_name, choices=[choice]
                )
                await sse.send(response, ENCODER.encode(chunk))
            else:
                if req.stream_options is not None and req.stream_options.include_usage:
                    heads = range(0, len(choices), req.n)
                    last = CompletionResponse(
                        id=rid,
                        created=created,
                        model=serving.model_name,
                        choices=[],
                        usage=usage(
                            sum(len(choices[i].ids) for i in heads),
                            completion_tokens,
                            sum(cached[i] for i in heads),
                        ),
                    )
                    await sse.send(response, ENCODER.encode(last))
        await sse.close(response)
    except sse.DISCONNECTED:
        pass  # the client left; the caller's ``finally`` aborts what still runs
    return response


# ------------------------------------------------------------------------------ chat


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    serving = request.app[SERVING]
    req = CHAT_DECODER.decode(await request.read())
    serving.check_model(req.model)
    reject_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    serving.check_choices(req.n)
    prompt = serving.chat_prompt(req.messages, req.add_generation_prompt)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = getattr(req, field)
    max_tokens = serving.max_tokens(len(prompt.ids), requested, None, field)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = [sampling_params(req, max_tokens, logprobs=logprobs, choice=j) for j in range(req.n)]
    rid = new_id("chatcmpl")
    streams = serving.submit(rid, [prompt] * req.n, params, client_id(request, req.user))
    try:
        if req.stream:
            return await _stream_chat(request, serving, rid, req, prompt, streams)
        results = await collect_all(streams)
    finally:
        serving.abort_unfinished(streams)
    check_results(results)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            logprobs=ChatLogprobs(content=chat_logprobs(serving, r.logprobs or ()))
            if req.logprobs
            else None,
            finish_reason=r.finish_reason,
        )
        for i, r in enumerate(results)
    ]
    return json_response(
        ChatCompletionResponse(
            id=rid,
            created=int(time.time()),
            model=serving.model_name,
            choices=choices,
            usage=usage(
                len(prompt.ids),
                sum(len(r.token_ids) for r in results),
                results[0].num_cached_tokens,
            ),
        )
    )


async def _stream_chat(
    request: web.Request,
    serving: Serving,
    rid: str,
    req: ChatCompletionRequest,
    prompt: Prompt,
    streams: list[RequestStream],
) -> web.StreamResponse:
    created = int(time.time())
    response = await sse.open_stream(request)

    def chunk(choice: ChatChunkChoice) -> bytes:
        return ENCODER.encode(
            ChatCompletionChunk(id=rid, created=created, model=serving.model_name, choices=[choice])
        )

    completion_tokens = 0
    cached = 0
    try:
        for i in range(len(streams)):
            role = Delta(role="assistant", content="")
            await sse.send(response, chunk(ChatChunkChoice(index=i, delta=role)))
        async with aclosing(merged(streams)) as outputs:
            async for i, out in outputs:
                if out.finish_reason == "error":
                    await sse.send(response, error_body(generation_error(out.error)))
                    break
                completion_tokens += len(out.new_token_ids)
                if i == 0:
                    cached = out.num_cached_tokens
                logprobs = _chat_chunk_logprobs(serving, req, out)
                if not out.new_text and logprobs is None and not out.finished:
                    continue
                delta = Delta(content=out.new_text) if out.new_text else Delta()
                choice = ChatChunkChoice(
                    index=i, delta=delta, logprobs=logprobs, finish_reason=out.finish_reason
                )
                await sse.send(response, chunk(choice))
            else:
                if req.stream_options is not None and req.stream_options.include_usage:
                    last = ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=serving.model_name,
                        choices=[],
                        usage=usage(len(prompt.ids), completion_tokens, cached),
                    )
                    await sse.send(response, ENCODER.encode(last))
        await sse.close(response)
    except sse.DISCONNECTED:
        pass  # the client left; the caller's ``finally`` aborts what still runs
    return response


def _chat_chunk_logprobs(
    serving: Serving, req: ChatCompletionRequest, out: RequestOutput
) -> ChatLogprobs | None:
    if not req.logprobs or not out.logprobs:
        return None
    return ChatLogprobs(content=chat_logprobs(serving, out.logprobs))


# ------------------------------------------------------------------------------ models, tokens


def _model_card(serving: Serving) -> ModelCard:
    info = serving.engine.backend.info if serving.engine.backend is not None else None
    return ModelCard(
        id=serving.model_name,
        created=serving.created,
        root=serving.engine.config.model or "demo",
        max_model_len=serving.max_model_len,
        description=info.description if info else "",
        random_weights=info.random_weights if info else False,
    )


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the one served model, saying plainly if its weights are random."""
    return json_response(ModelList(data=[_model_card(request.app[SERVING])]))


async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``."""
    serving = request.app[SERVING]
    serving.check_model(request.match_info["model"])
    return json_response(_model_card(serving))


async def tokenize(request: web.Request) -> web.Response:
    """``POST /tokenize``: a prompt, or chat messages through the template, to token ids."""
    serving = request.app[SERVING]
    req = TOKENIZE_DECODER.decode(await request.read())
    serving.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of `prompt` and `messages`", param="prompt")
    if req.prompt is not None:
        ids = serving.encode(req.prompt, req.add_special_tokens)
    else:
        ids = serving.chat_prompt(req.messages or [], req.add_generation_prompt).ids
    return json_response(
        TokenizeResponse(count=len(ids), max_model_len=serving.max_model_len, tokens=ids)
    )


async def detokenize(request: web.Request) -> web.Response:
    """``POST /detokenize``: token ids to text."""
    serving = request.app[SERVING]
    req = DETOKENIZE_DECODER.decode(await request.read())
    serving.check_model(req.model)
    ids = serving.check_ids(req.tokens, "tokens", allow_empty=True)
    return json_response(DetokenizeResponse(prompt=serving.tokenizer.decode(ids)))
