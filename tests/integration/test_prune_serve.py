"""A checkpoint from ``slmserve prune`` serves through the engine as transformers runs it."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from checkpoints import hf_greedy

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.cli import main
from slmserve.engine import collect

pytestmark = pytest.mark.slow
MAX_NEW = 8


def reference(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    return hf_greedy(path, prompts, MAX_NEW)


async def served(path: Path, backend: str, prompts: list[list[int]]) -> list[list[int]]:
    cfg = EngineConfig(model=str(path), backend=backend, device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    async with Engine(cfg) as engine:
        results = await asyncio.gather(*(collect(engine.submit(p, params)) for p in prompts))
    return [r.token_ids for r in results]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_pruned_checkpoint_serves_like_transformers(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src: Path = request.getfixturevalue(f"{kind}_dir")
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "the engine must match transformers token for token"}\n' * 40)
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(src), "--out", str(out), "--calib", str(calib)]
    args += ["--mlp-keep", "0.5", "--kv-groups-keep", "0.5", "--samples", "8", "--seq-len", "64"]
    assert main([*args, "--no-progress", "--device", "cpu"]) == 0
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(4, 40))] for _ in range(6)]
    want = reference(out, prompts)
    assert asyncio.run(served(out, "native", prompts)) == want
    assert asyncio.run(served(out, "osscar", prompts)) == want
