"""The engine's greedy output equals transformers' generate, under every scheduling stress.

32 concurrent requests with shared prefixes, small prefill chunks and a KV pool too small for
all of them, so chunked prefill, prefix hits, eviction and preemption all happen.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from checkpoints import hf_greedy

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect

pytestmark = pytest.mark.slow

NUM_REQUESTS = 32
MAX_NEW = 12


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    usable = range(3, min(vocab, 256))  # plain byte tokens
    prefixes = [[rng.choice(usable) for _ in range(rng.randint(20, 40))] for _ in range(4)]
    prompts = []
    for i in range(NUM_REQUESTS):
        tail = [rng.choice(usable) for _ in range(rng.randint(1, 30))]
        prompts.append(prefixes[i % 4] + tail if i % 5 else tail + prefixes[i % 4])
    return prompts


def _reference(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    return hf_greedy(path, prompts, MAX_NEW)


async def _run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    async with engine:
        results = await asyncio.gather(*(collect(engine.submit(p, params)) for p in prompts))
        engine.core.check_integrity()
        assert not engine.core.running and not engine.core.waiting
        assert engine.core.cache.protected_size == 0
        assert engine.kv.allocator.num_free + engine.core.cache.total_size == engine.kv.num_slots
    assert all(r.finish_reason == "length" for r in results), [r.error for r in results]
    return [r.token_ids for r in results]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_greedy_parity_under_pressure(kind: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(f"{kind}_dir")
    engine = Engine(
        EngineConfig(
            model=str(path),
            device="cpu",
            dtype="float32",
            kv_tokens=400,
            chunked_prefill_size=16,
            max_batch_tokens=96,
            max_running_requests=32,
        )
    )
    prompts = _prompts(300)
    got = asyncio.run(_run(engine, prompts))
    want = _reference(path, prompts)
    assert engine.core.num_preemptions > 0, "the KV pool was meant to force preemption"
    assert engine.core.num_evicted_tokens > 0, "the KV pool was meant to force eviction"
    assert engine.core.prefix_hits > 0, "shared prefixes were meant to hit the cache"
    mismatched = [i for i in range(len(prompts)) if got[i] != want[i]]
    assert not mismatched, (
        f"requests {mismatched} differ, first: {got[mismatched[0]]} vs {want[mismatched[0]]}"
    )


def test_roomy_pool_parity(qwen3_dir: Path) -> None:
    """Same check with everything fitting: no preemption, one big batch."""
    engine = Engine(
        EngineConfig(model=str(qwen3_dir), device="cpu", dtype="float32", kv_tokens=8192)
    )
    prompts = _prompts(300, seed=1)
    got = asyncio.run(_run(engine, prompts))
    assert engine.core.num_preemptions == 0
    assert got == _reference(qwen3_dir, prompts)
