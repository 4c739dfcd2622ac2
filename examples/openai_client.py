#!/usr/bin/env python3
"""Talk to ``slmserve serve`` with the official ``openai`` client: completions, chat, streaming.

Start a server first (the embedded demo model: random weights, meaningless text)::

    slmserve serve --port 8000

then run ``python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os

from openai import AsyncOpenAI


async def main(base_url: str, api_key: str) -> None:
    async with AsyncOpenAI(base_url=base_url, api_key=api_key) as client:
        models = await client.models.list()
        model = models.data[0].id
        print(f"model: {model}")

        completion = await client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=16, temperature=0.0
        )
        print(f"completion: {completion.choices[0].text!r}")

        # echo + logprobs + max_tokens=0: score a text (its log-likelihood), generate nothing.
        scored = await client.completions.create(
            model=model, prompt="The cat sat on the mat.", max_tokens=0, echo=True, logprobs=0
        )
        lps = scored.choices[0].logprobs
        assert lps is not None and lps.token_logprobs is not None
        total = sum(x for x in lps.token_logprobs if x is not None)
        perplexity = math.exp(-total / max(1, len(lps.token_logprobs) - 1))
        print(f"log-likelihood: {total:.2f} (perplexity {perplexity:.1f})")

        chat = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=16,
            user="example-client",  # the fairness key for the vtc / dlpm schedulers
        )
        print(f"chat: {chat.choices[0].message.content!r}")

        print("stream: ", end="", flush=True)
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            for choice in chunk.choices:
                print(choice.delta.content or "", end="", flush=True)
            if chunk.usage is not None:
                print(f"\nusage: {chunk.usage.total_tokens} tokens")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("SLMSERVE_API_KEY", "unused"))
    args = parser.parse_args()
    asyncio.run(main(args.base_url, args.api_key))
