"""Engine scoring: prefill only, label logits only, shared query prefix through the cache."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import load_hf

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.engine import collect

LABELS = (89, 78)  # "Y", "N" in the byte tokenizer


def _reference(path: Path, prompts: list[list[int]], labels: tuple[int, ...]) -> list[list[float]]:
    model = load_hf(path)
    out = []
    with torch.inference_mode():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            lab = logits[list(labels)]
            out.append(torch.softmax(lab, -1).tolist())
    return out


def _raw_reference(
    path: Path, prompts: list[list[int]], labels: tuple[int, ...]
) -> list[list[float]]:
    model = load_hf(path)
    with torch.inference_mode():
        return [
            torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)[
                list(labels)
            ].tolist()
            for ids in prompts
        ]


@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize("kv_tokens", [4096, 160])
def test_scores_match_transformers(qwen3_dir: Path, kv_tokens: int, overlap: str) -> None:
    query = "Query: senior python engineer, remote. "
    items = ["Job: python developer", "Job: chef in a busy kitchen, evenings " * 3, "x", "Job: SRE"]
    engine = Engine(
        EngineConfig(
            model=str(qwen3_dir),
            device="cpu",
            dtype="float32",
            kv_tokens=kv_tokens,
            chunked_prefill_size=8,
            max_batch_tokens=48,
            overlap=overlap,
        )
    )

    async def run() -> tuple[object, object]:
        async with engine:
            res = await engine.score(query, items, label_token_ids=LABELS)
            raw = await engine.score(query, items, label_token_ids=LABELS, apply_softmax=False)
            engine.core.check_integrity()
            assert engine.core.cache.protected_size == 0
            return res, raw

    res, raw = asyncio.run(run())
    tok = engine.tokenizer
    q = tok.encode(query, add_special_tokens=False)
    prompts = [q + tok.encode(x, add_special_tokens=False) for x in items]
    want = _reference(qwen3_dir, prompts, LABELS)
    for got_row, want_row in zip(res.scores, want):
        assert got_row == pytest.approx(want_row, abs=1e-4)
    for got_row, want_row in zip(raw.scores, _raw_reference(qwen3_dir, prompts, LABELS)):
        assert got_row == pytest.approx(want_row, abs=1e-4)
    assert res.prompt_tokens == sum(map(len, prompts))
    if kv_tokens == 4096:
        # The query prefix was computed once (warm-up), then every item extended it.
        assert res.cached_tokens >= len(q) * len(items) - len(items)


def test_item_first_and_templates_and_token_ids(qwen3_dir: Path) -> None:
    engine = Engine(
        EngineConfig(model=str(qwen3_dir), device="cpu", dtype="float32", kv_tokens=4096)
    )

    async def run() -> list[object]:
        async with engine:
            return [
                await engine.score(
                    "q", ["item one", "item two"], label_token_ids=LABELS, item_first=True
                ),
                await engine.score(
                    "q", ["item one"], label_token_ids=LABELS, template="Is {item} about {query}? "
                ),
                await engine.score([70, 71, 72], [[73, 74], [75]], label_token_ids=LABELS),
            ]

    first, templ, ids = asyncio.run(run())
    tok = engine.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    want = _reference(
        qwen3_dir,
        [
            enc("item one") + enc("q"),
            enc("item two") + enc("q"),
            enc("Is ") + enc("item one") + enc(" about q? "),
            [70, 71, 72, 73, 74],
            [70, 71, 72, 75],
        ],
        LABELS,
    )
    got = first.scores + templ.scores + ids.scores
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)


async def test_bad_scoring_input(qwen3_dir: Path) -> None:
    async with Engine(EngineConfig(model=str(qwen3_dir), device="cpu", kv_tokens=2048)) as engine:
        with pytest.raises(ValueError, match="items is empty"):
            await engine.score("q", [], label_token_ids=LABELS)
        with pytest.raises(ValueError, match="not one string"):
            await engine.score("q", "abc", label_token_ids=LABELS)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="label_token_ids outside"):
            await engine.score("q", ["a"], label_token_ids=(1, 10**6))
        with pytest.raises(ValueError, match="label_token_ids is empty"):
            await engine.score("q", ["a"], label_token_ids=())
        with pytest.raises(ValueError, match="item 1 is empty"):
            await engine.score("q", ["a", ""], label_token_ids=LABELS)
        with pytest.raises(ValueError, match=r"\{item\} exactly once"):
            await engine.score("q", ["a"], label_token_ids=LABELS, template="{query}")
        ok = await engine.score("q", ["a"], label_token_ids=LABELS)
        assert len(ok.scores) == 1 and sum(ok.scores[0]) == pytest.approx(1.0)


def test_overlapped_steps_give_the_same_scores_and_keep_the_cache_sound(qwen3_dir: Path) -> None:
    """Many scoring requests at once, a generation request among them and aborts of requests
    whose step is on the device: the same scores and tokens with ``overlap`` on as off, and
    every KV slot accounted for after."""
    queries = [f"Query {i}: python engineer, remote. " for i in range(6)]
    items = [f"Job {j}: " + "developer " * (j % 4 + 1) for j in range(7)]

    async def run(overlap: str) -> tuple[list[list[list[float]]], list[int], int]:
        config = EngineConfig(
            model=str(qwen3_dir),
            device="cpu",
            dtype="float32",
            kv_tokens=1024,
            chunked_prefill_size=32,
            max_batch_tokens=96,
            overlap=overlap,
        )
        async with Engine(config) as engine:
            gen = asyncio.ensure_future(
                collect(
                    engine.submit(
                        "story:", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
                    )
                )
            )
            scores = [
                engine.score(q, items, label_token_ids=LABELS, client_id=f"c{i}")
                for i, q in enumerate(queries)
            ]
            results = await asyncio.gather(*scores)
            tokens = (await gen).token_ids
            # Abort whatever runs two steps into a new burst: some of it is in flight.
            doomed = asyncio.gather(
                *(engine.score(q, items[:3], label_token_ids=LABELS) for q in queries[:3]),
                return_exceptions=True,
            )
            for _ in range(200):
                await asyncio.sleep(0)
                if engine.times.steps >= 2 + len(results) and engine.core.running:
                    break
            for rid in list(engine.core.running):
                engine.abort(rid)
            outcomes = await doomed
            assert all(isinstance(o, RuntimeError) or len(o.scores) == 3 for o in outcomes)
            again = await engine.score(queries[0], items, label_token_ids=LABELS)
            engine.core.check_integrity()
            assert engine.core.cache.protected_size == 0
            _assert_close(again.scores, results[0].scores)
            return [r.scores for r in results], tokens, engine.times.overlapped

    serial, serial_tokens, none = asyncio.run(run("off"))
    overlapped, tokens, count = asyncio.run(run("on"))
    assert none == 0 and count > 0
    assert tokens == serial_tokens
    for a, b in zip(overlapped, serial):
        _assert_close(a, b)


def _assert_close(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)


async def test_a_cancelled_score_call_aborts_its_items(qwen3_dir: Path) -> None:
    """A caller that goes away (an HTTP client hanging up cancels its handler) takes its
    scoring work with it: nothing of it is left running or waiting."""
    config = EngineConfig(model=str(qwen3_dir), device="cpu", dtype="float32", kv_tokens=4096,
                          max_batch_tokens=64, chunked_prefill_size=64)  # fmt: skip
    async with Engine(config) as engine:
        items = [f"item {i} " * 6 for i in range(300)]
        task = asyncio.ensure_future(engine.score("query: ", items, label_token_ids=LABELS))
        for _ in range(500):
            if engine.times.steps >= 3:
                break
            await asyncio.sleep(0.01)
        assert engine.core is not None and len(engine.core.waiting) > 100  # far from done
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_at = engine.times.steps
        for _ in range(500):  # the aborts apply between steps: a step or two, not the rest
            if engine.times.steps >= cancelled_at + 2:
                break
            await asyncio.sleep(0.01)
        assert not engine.core.running and not engine.core.waiting
        engine.core.check_integrity()
        ok = await engine.score("query: ", items[:2], label_token_ids=LABELS)
        assert len(ok.scores) == 2


async def test_label_logits_of_the_wrong_shape_are_an_error_not_scores(qwen3_dir: Path) -> None:
    config = EngineConfig(model=str(qwen3_dir), device="cpu", dtype="float32", kv_tokens=1024)
    async with Engine(config) as engine:
        real = engine.backend.logits

        def short(hidden: Any, vocab_ids: Any = None) -> Any:
            out = real(hidden, vocab_ids=vocab_ids)
            return out if vocab_ids is None else out[:, :-1]  # one label column missing

        engine.backend.logits = short  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match=r"label logits of shape \[1, 1\] for 1 rows x 2"):
            await engine.score("q", ["item"], label_token_ids=[5, 6])
        engine.backend.logits = real  # type: ignore[method-assign]
        ok = await engine.score("q", ["item"], label_token_ids=[5, 6])
        assert len(ok.scores[0]) == 2
