"""The asyncio engine and its synchronous convenience wrapper."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from slmserve.engine.engine import AsyncEngine, EngineClosedError, QueueFullError, RequestStream
from slmserve.types import GenerationResult, RequestOutput, SamplingParams

__all__ = [
    "AsyncEngine",
    "Engine",
    "EngineClosedError",
    "QueueFullError",
    "RequestStream",
    "collect",
]


async def collect(stream: RequestStream | object) -> GenerationResult:
    """Drain a request's stream into one :class:`GenerationResult`."""
    text: list[str] = []
    ids: list[int] = []
    logprobs = None
    last: RequestOutput | None = None
    prompt_logprobs = None
    async for out in stream:  # type: ignore[attr-defined]
        text.append(out.new_text)
        ids.extend(out.new_token_ids)
        if out.logprobs is not None:
            logprobs = (logprobs or []) + out.logprobs
        if out.prompt_logprobs is not None:
            prompt_logprobs = out.prompt_logprobs
        last = out
    assert last is not None
    return GenerationResult(
        request_id=last.request_id,
        text="".join(text),
        token_ids=ids,
        finish_reason=last.finish_reason,
        num_prompt_tokens=last.num_prompt_tokens,
        num_cached_tokens=last.num_cached_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        error=last.error,
    )


class Engine(AsyncEngine):
    """The public engine: async API plus ``generate_batch`` for plain scripts."""

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[GenerationResult]:
        """Start the engine, run every prompt concurrently, stop it; results in prompt order.

        Must not be called from inside a running event loop (use ``generate`` there).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("generate_batch() cannot run inside an event loop; use generate()")
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(prompts)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(prompts):
                raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        return asyncio.run(self._run_batch(prompts, per_prompt, progress))

    async def _run_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: list[SamplingParams],
        progress: bool,
    ) -> list[GenerationResult]:
        from tqdm.auto import tqdm

        async with self:
            bar = tqdm(total=len(prompts), disable=not progress, unit="req")

            async def one(prompt: str | Sequence[int], p: SamplingParams) -> GenerationResult:
                result = await collect(self.submit(prompt, p))
                bar.update(1)
                return result

            try:
                return list(await asyncio.gather(*(one(x, p) for x, p in zip(prompts, params))))
            finally:
                bar.close()
