"""``summary``: real engine summaries within the serving budget, cached in SQLite for good.

The summariser is the tiny ``qwen3_dir`` checkpoint (random weights: the summaries are
gibberish, which is fine — what matters is where they come from and where they go). The
serving tokenizer is the demo's byte tokenizer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from slmserve import Engine, EngineConfig, SamplingParams
from slmserve.compressors import count_tokens, encode
from slmserve.compressors import summary as summary_module
from slmserve.compressors.summary import Summariser, Summary, get_summariser
from slmserve.compressors.truncate import Truncate
from slmserve.plugins import PluginManager

ITEMS = [
    f"Posting {i}: Python engineer, Berlin. Spark and Airflow pipelines. {40 + 5 * i}k EUR. "
    * (1 + i % 2)
    for i in range(5)
]
PROMPT = "Summarise:\n{item}\nSummary:"


@pytest.fixture(scope="module")
def tok(demo_backend: Any) -> Any:
    return demo_backend.tokenizer


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "summaries.sqlite")


def make(qwen3_dir: Path, cache: str, **options: Any) -> Summary:
    return Summary(**{"model": str(qwen3_dir), "cache": cache, "device": "cpu", **options})


class Calls:
    """Counts the summariser's engine batches (and items) by wrapping ``summarise``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches = 0
        self.items = 0
        self._lock = threading.Lock()
        real = Summariser.summarise

        def counting(sm: Summariser, items: list[str], *args: Any) -> list[str]:
            with self._lock:
                self.batches += 1
                self.items += len(items)
            return real(sm, items, *args)

        monkeypatch.setattr(Summariser, "summarise", counting)


def test_registered_through_the_hook() -> None:
    entries = {e.name: e for e in PluginManager(load_entrypoints=False).compressors.entries()}
    assert entries["summary"].plugin == "slmserve.compressors.summary"
    assert Summary.runs_model


def test_summaries_come_from_the_engine_within_the_budget(
    qwen3_dir: Path, cache: str, tok: Any
) -> None:
    budget = 5
    comp = make(qwen3_dir, cache, max_tokens=budget, prompt=PROMPT, chat=False)
    short = "x" * budget
    out = comp.compress_many([*ITEMS, short], query="python", tokenizer=tok)
    assert out[-1] == short  # already within the budget: untouched, no summary
    assert all(0 < count_tokens(tok, text) <= budget for text in out)
    # The same greedy generation, run by hand on a separate engine over the same checkpoint.
    engine = Engine(EngineConfig(model=str(qwen3_dir), device="cpu", gc_freeze=False))
    results = engine.generate_batch(
        [PROMPT.replace("{item}", x) for x in ITEMS],
        SamplingParams(max_tokens=budget, temperature=0.0),
    )
    head = Truncate(max_tokens=budget)
    for got, item, result in zip(out, ITEMS, results):
        # cut to the serving budget (a blank summary falls back to the item's head)
        assert got == head.compress(result.text.strip() or item, query="", tokenizer=tok)
    assert comp.stats.generated == len(ITEMS) and comp.stats.short == 1


def test_a_different_serving_tokenizer_gets_the_summary_cut_to_its_budget(
    qwen3_dir: Path, cache: str
) -> None:
    class TwoPerChar:
        """Two tokens per character: summaries of <= N summariser tokens are too long here."""

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text for _ in range(2)]

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(i) for i in ids[::2])

    serving = TwoPerChar()
    for budget in (5, 8):
        comp = make(qwen3_dir, cache, max_tokens=budget, prompt=PROMPT, chat=False)
        out = comp.compress_many(ITEMS, query="", tokenizer=serving)
        assert all(0 < count_tokens(serving, text) <= budget for text in out)


def test_second_call_reads_the_cache_with_no_model_call(
    qwen3_dir: Path, cache: str, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch)
    first = make(qwen3_dir, cache, max_tokens=8).compress_many(ITEMS, query="", tokenizer=tok)
    assert (calls.batches, calls.items) == (1, len(ITEMS))  # every miss in one batch
    again = make(qwen3_dir, cache, max_tokens=8)  # a new object, as per request in the server
    assert again.compress_many(ITEMS, query="", tokenizer=tok) == first
    assert [again.compress(x, query="other", tokenizer=tok) for x in ITEMS] == first
    assert calls.batches == 1
    assert again.stats.hits == 2 * len(ITEMS) and again.stats.generated == 0


@pytest.mark.slow
def test_survives_a_restart_without_loading_a_model(qwen3_dir: Path, cache: str, tok: Any) -> None:
    first = make(qwen3_dir, cache, max_tokens=8).compress_many(ITEMS, query="", tokenizer=tok)
    script = (
        "import json, sys\n"
        "from slmserve.compressors import summary\n"
        "from slmserve.models.demo import build_byte_tokenizer\n"
        "class Tok:  # the serving tokenizer, without loading transformers\n"
        "    backend_tokenizer = build_byte_tokenizer()\n"
        "tok = Tok()\n"
        "items = json.loads(sys.stdin.read())\n"
        f"comp = summary.Summary(model={str(qwen3_dir)!r}, cache={cache!r}, device='cpu', "
        "max_tokens=8)\n"
        "out = comp.compress_many(items, query='', tokenizer=tok)\n"
        "print(json.dumps({'out': out, 'loaded': len(summary._SUMMARISERS)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(ITEMS),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"out": first, "loaded": 0}


def test_the_key_covers_every_setting_that_changes_the_output(
    qwen3_dir: Path, cache: str, tmp_path: Path
) -> None:
    base = make(qwen3_dir, cache)
    assert make(qwen3_dir, cache).key == base.key
    changed = [
        make(qwen3_dir, cache, max_tokens=base.max_tokens + 1),
        make(qwen3_dir, cache, prompt=PROMPT),
        make(qwen3_dir, cache, chat=False),
        make(qwen3_dir, cache, dtype="bfloat16"),
        Summary(cache=cache, device="cpu"),  # the demo model
    ]
    keys = {c.key for c in changed}
    assert base.key not in keys and len(keys) == len(changed)
    # A copy of the checkpoint is the same model; new weights are not.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in qwen3_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert make(copy, cache).key == base.key
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert make(copy, cache).key != base.key


def test_changed_settings_summarise_again(
    qwen3_dir: Path, cache: str, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch)
    make(qwen3_dir, cache, max_tokens=6).compress_many(ITEMS[:2], query="", tokenizer=tok)
    make(qwen3_dir, cache, max_tokens=6, prompt=PROMPT).compress_many(
        ITEMS[:2], query="", tokenizer=tok
    )
    assert calls.batches == 2
    assert make(qwen3_dir, cache).store.count() == 4


def test_concurrent_threads_summarise_each_item_once(
    qwen3_dir: Path, cache: str, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    comp = make(qwen3_dir, cache, max_tokens=6, prompt="Short: {item}")
    calls = Calls(monkeypatch)
    work = [ITEMS[i % 5 :] + ITEMS[: i % 5] for i in range(8)]  # overlapping, rotated
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda xs: comp.compress_many(xs, query="", tokenizer=tok), work))
    by_item = {x: y for xs, ys in zip(work, outs) for x, y in zip(xs, ys)}
    assert all(by_item[x] == y for xs, ys in zip(work, outs) for x, y in zip(xs, ys))
    assert calls.items == len(ITEMS)  # no item summarised twice
    assert comp.store.count(comp.key) == len(ITEMS)
    assert comp.stats.generated == len(ITEMS)
    assert comp.stats.hits == 8 * len(ITEMS) - len(ITEMS)


def test_items_longer_than_the_summariser_context_are_cut_to_fit(qwen3_dir: Path) -> None:
    sm = get_summariser(str(qwen3_dir), "cpu", "float32")
    long_item = "data engineering " * 200  # far beyond the checkpoint's 256 positions
    prompt = sm.render(long_item, PROMPT, False, 16)
    assert len(encode(sm.tokenizer, prompt)) <= sm.context - 16
    assert prompt.startswith("Summarise:\ndata engineering") and prompt.endswith("\nSummary:")
    with pytest.raises(ValueError, match="max_tokens"):
        sm.render(long_item, "x" * 300 + "{item}", False, 16)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "8"}, "max_tokens"),
        ({"prompt": "Summarise this"}, "prompt"),
        ({"chat": "yes"}, "chat"),
        ({"dtype": "float64"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"model": "/nonexistent/model"}, "model"),
    ],
)
def test_bad_options_name_the_option(
    options: dict[str, Any], option: str, qwen3_dir: Path, cache: str
) -> None:
    with pytest.raises(ValueError, match=option):
        make(qwen3_dir, cache, **options)


def test_unreadable_model_dir_and_cache_path_are_value_errors(
    tmp_path: Path, qwen3_dir: Path, cache: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"model: config\.json not found"):
        make(empty, cache)
    with pytest.raises(ValueError, match="cache"):
        make(qwen3_dir, str(tmp_path))  # a directory is not a SQLite file


def test_default_cache_lives_under_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLMSERVE_CACHE_DIR", str(tmp_path))
    assert summary_module.default_cache_path() == tmp_path / "summaries.sqlite"
    comp = Summary(device="cpu")
    assert comp.store.path == (tmp_path / "summaries.sqlite").resolve()
