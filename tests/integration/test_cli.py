"""The ``slmserve`` command on the demo model: generate, score, and clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmserve.cli import main

pytestmark = pytest.mark.slow
ENGINE = ["--kv-tokens", "4096", "--device", "cpu"]


def test_generate_prints_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hello", "--max-tokens", "4", "--ignore-eos", "--json", *ENGINE]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["prompt"] == "hello" and len(record["token_ids"]) == 4


def test_score_writes_one_line_per_item(tmp_path: Path) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": "a", "text": "python developer"}\n{"id": "b", "text": "chef"}\n')
    out = tmp_path / "scores.jsonl"
    args = ["score", "--query", "python job: ", "--items", str(items), "--labels", "Y,N"]
    assert main([*args, "--output", str(out), "--no-progress", *ENGINE]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)


def test_bad_input_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\nnot json\n')
    args = ["score", "--query", "q", "--items", str(bad), "--labels", "Y,N", *ENGINE]
    assert main(args) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["generate", "--input", str(tmp_path / "missing.jsonl"), *ENGINE]) == 2
    assert "input file not found" in capsys.readouterr().err
    assert main(["generate", "x", "--scheduler-opt", "nokey", *ENGINE]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "--top-p", "0", "--temperature", "1"], "top_p"),
        (["generate", "x", "--max-tokens", "-5"], "max_tokens"),
        (["generate", "x", "--output", "/nonexistent/dir/out.jsonl"], "cannot write"),
        (["generate", "x", "--scheduler", "klpm", "--scheduler-opt", "k=-1"], "k"),
        (["generate", "x", "--scheduler-opt", "nope=1"], "FCFS() takes no arguments"),
        (["generate", "x", "--model", "/nonexistent/model"], "/nonexistent/model"),
        (["generate", "--input", "."], "cannot read input file"),
        (["score", "--query", "q", "--items", ".", "--labels", "Y,N"], "cannot read items"),
        (["score", "--query", "", "--items", ".", "--labels", "Y,N"], "--query is empty"),
    ],
)
def test_more_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Values the engine or the file system refuses are CLI errors too, found before any work
    whose output would be lost."""
    assert main([*args, *ENGINE]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err


def test_a_bad_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--log-level", "bogus", "generate", "x"])
    assert exc.value.code == 2 and "--log-level" in capsys.readouterr().err
