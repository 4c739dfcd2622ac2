"""``slmserve compress``: a catalog through a compressor chain, the summary cache filled once and
then read by ``slmserve score``; bad input exits 2 with a one-line message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slmserve.cli import main
from slmserve.compressors import count_tokens
from slmserve.compressors.summary import Summary

ITEMS = [
    {"id": f"job-{i}", "text": f"Job {i}: data engineer in Lyon. Python, Spark, SQL. " * 3}
    for i in range(6)
] + [{"id": "short", "text": "Chef, Paris."}]


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return path


def summary_args(qwen3_dir: Path, cache: Path) -> list[str]:
    opts = ["max_tokens=16", f"model={qwen3_dir}", f"cache={cache}", "device=cpu"]
    return ["--compressor", "summary", *(x for o in opts for x in ("--compressor-opt", o))]


def test_truncate_chain_writes_compressed_items_and_the_ratio(
    catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], demo_backend: object
) -> None:
    out = tmp_path / "out.jsonl"
    args = ["compress", "--items", str(catalog), "--compressor", "truncate"]
    assert main([*args, "--compressor-opt", "max_tokens=16", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in ITEMS]
    tok = demo_backend.tokenizer  # type: ignore[attr-defined]
    assert all(count_tokens(tok, r["text"]) <= 16 for r in rows)
    assert rows[-1]["text"] == ITEMS[-1]["text"]
    before = sum(count_tokens(tok, r["text"]) for r in ITEMS)
    after = sum(count_tokens(tok, r["text"]) for r in rows)
    err = capsys.readouterr().err
    assert f"compressed {len(ITEMS)} items" in err
    assert f"{before} -> {after} tokens ({before / after:.2f}x)" in err


@pytest.mark.slow
def test_summary_cache_is_filled_once_then_read_by_score(
    catalog: Path,
    tmp_path: Path,
    qwen3_dir: Path,
    capsys: pytest.CaptureFixture[str],
    demo_backend: object,
) -> None:
    cache = tmp_path / "summaries.sqlite"
    out = tmp_path / "out.jsonl"
    args = ["compress", "--items", str(catalog), *summary_args(qwen3_dir, cache)]
    assert main([*args, "--batch-size", "4", "--no-progress", "--output", str(out)]) == 0
    assert "summary: 0 cache hits, 6 generated, 1 already within the budget" in (
        capsys.readouterr().err
    )
    # What was written is what the compressor gives for the same settings (now from the cache).
    comp = Summary(max_tokens=16, model=str(qwen3_dir), cache=str(cache), device="cpu")
    tok = demo_backend.tokenizer  # type: ignore[attr-defined]
    want = comp.compress_many([r["text"] for r in ITEMS], query="", tokenizer=tok)
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == want
    assert comp.stats.generated == 0 and comp.store.count(comp.key) == 6

    assert main([*args, "--no-progress"]) == 0
    assert "summary: 6 cache hits, 0 generated" in capsys.readouterr().err

    scores = tmp_path / "scores.jsonl"
    score = ["score", "--query", "python: ", "--items", str(catalog), "--labels", "Y,N"]
    engine = ["--kv-tokens", "4096", "--device", "cpu", "--no-progress", "--output", str(scores)]
    assert main([*score, *summary_args(qwen3_dir, cache), *engine]) == 0
    match = re.search(r"compression (\d+\.\d+)x", capsys.readouterr().err)
    assert match and float(match.group(1)) > 3
    assert len(scores.read_text().splitlines()) == len(ITEMS)


def test_bad_input_exits_2_naming_the_problem(
    catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = ["compress", "--items", str(tmp_path / "missing.jsonl"), "--compressor", "truncate"]
    assert main(missing) == 2
    assert "items file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "ok"}\n{"id": 2, "text": \n')
    assert main(["compress", "--items", str(bad), "--compressor", "truncate"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    bad.write_text('{"id": 1, "text": "ok"}\n{"text": "no id"}\n')
    assert main(["compress", "--items", str(bad), "--compressor", "truncate"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    zero = ["--compressor", "summary", "--compressor-opt", "max_tokens=0"]
    assert main(["compress", "--items", str(catalog), *zero]) == 2
    err = capsys.readouterr().err
    assert "max_tokens must be a positive integer" in err and len(err.strip().splitlines()) == 1
    no_model = ["--compressor", "summary", "--compressor-opt", f"model={tmp_path / 'nope'}"]
    assert main(["compress", "--items", str(catalog), *no_model]) == 2
    assert "model: model directory" in capsys.readouterr().err
    assert main(["compress", "--items", str(catalog), "--compressor", "truncate", "--model", "x"])
    assert "--model" in capsys.readouterr().err
