"""``slmserve prune``: a full run, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from slmserve.cli import main


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text("Structured pruning removes whole neurons and heads. " * 60)
    return path


def prune_args(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return [
        "prune",
        "--model",
        str(model),
        "--out",
        str(out),
        "--calib",
        str(calib),
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def test_prune_writes_a_checkpoint_and_a_report(
    qwen3_dir: Path, tmp_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = prune_args(qwen3_dir, out, calib, "--mlp-keep", "0.75,0.5", "--kv-groups-keep", "0.5")
    assert main([*args, "--local-search"]) == 0
    printed = capsys.readouterr().out
    assert "64/128" in printed and "96/128" in printed and "1/2" in printed
    assert "parameters: 117,952 -> " in printed and "layer_shapes" in printed
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "osscar" and report["local_search"]
    assert [layer["mlp_kept"] for layer in report["layers"]] == [96, 64]
    assert all(0 < layer["mlp_error"] < 1 for layer in report["layers"])
    meta = json.loads((out / "config.json").read_text())["slmserve"]["pruning"]
    assert meta["parameters_after"] == report["parameters_after"] < report["parameters_before"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mlp-keep", "0"], r"--mlp-keep must be in \(0, 1\]"),
        (["--mlp-keep", "1.2"], r"--mlp-keep must be in \(0, 1\]"),
        (["--mlp-keep", "half"], "--mlp-keep must be a fraction"),
        (["--kv-groups-keep", "0.3"], "whole number"),
        (["--mlp-keep", "0.5,0.5,0.5"], "3 values given for 2 layers"),
        ([], "nothing to prune"),
        (["--mlp-keep", "0.5", "--method", "wanda", "--local-search"], "osscar only"),
        (["--mlp-keep", "0.5", "--samples", "0"], "--samples must be >= 1"),
    ],
)
def test_bad_budgets_exit_2_with_one_line(
    qwen3_dir: Path,
    tmp_path: Path,
    calib: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    assert main(prune_args(qwen3_dir, tmp_path / "out", calib, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slmserve prune: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_bad_files_exit_2_with_one_line(
    qwen3_dir: Path, tmp_path: Path, calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = ("--mlp-keep", "0.5")
    cases = []
    cases.append((prune_args(qwen3_dir, tmp_path / "o1", tmp_path / "no.txt", *keep), "not found"))
    mistral = tmp_path / "mistral"
    shutil.copytree(qwen3_dir, mistral)
    cfg = json.loads((mistral / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mistral / "config.json").write_text(json.dumps(cfg))
    cases.append((prune_args(mistral, tmp_path / "o2", calib, *keep), "MistralForCausalLM"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    cases.append((prune_args(qwen3_dir, busy, calib, *keep), "not an empty directory"))
    cases.append((prune_args(qwen3_dir, qwen3_dir, calib, *keep), "must differ"))
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
