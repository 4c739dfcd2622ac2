"""Built-in compressors: budgets hold, extractive keeps what matches the query, in order."""

from __future__ import annotations

from typing import Any

import pytest

from slmserve.compressors import count_tokens
from slmserve.compressors.extractive import Extractive, bm25, split_segments, words
from slmserve.compressors.truncate import Truncate
from slmserve.plugins import PluginManager


@pytest.fixture(scope="module")
def plugins() -> PluginManager:
    return PluginManager(load_entrypoints=False)


@pytest.fixture(scope="module")
def tok(plugins: PluginManager) -> Any:
    return plugins.backends.get("native")(None, device="cpu", dtype="float32").tokenizer


POSTING = (
    "Line cook wanted for a busy bistro. "
    "You will prepare sauces and plate desserts. "
    "Experience with Python scripting for inventory is a plus. "
    "Shifts are evenings and weekends.\n"
    "Location: Lyon | Salary: 2.4k EUR; Contract: permanent"
)


def test_registered_through_the_hook(plugins: PluginManager) -> None:
    assert {"truncate", "extractive"} <= set(plugins.compressors.names())
    entry = {e.name: e for e in plugins.compressors.entries()}["extractive"]
    assert entry.plugin == "slmserve.compressors.extractive"


@pytest.mark.parametrize("budget", [1, 5, 17, 40, 200])
@pytest.mark.parametrize("mode", ["head", "head_tail"])
def test_truncate_respects_the_budget(tok: Any, budget: int, mode: str) -> None:
    out = Truncate(max_tokens=budget, mode=mode).compress(POSTING, query="", tokenizer=tok)
    assert 0 < count_tokens(tok, out) <= budget
    if budget >= count_tokens(tok, POSTING):
        assert out == POSTING
    elif mode == "head":
        assert POSTING.startswith(out)
    elif budget >= 40:
        assert out.startswith(POSTING[:5]) and out.endswith("permanent") and " ... " in out


def test_extractive_keeps_the_matching_sentence_in_order(tok: Any) -> None:
    comp = Extractive(max_tokens=100)
    out = comp.compress(POSTING, query="python developer, evenings", tokenizer=tok)
    assert count_tokens(tok, out) <= 100
    assert "Experience with Python scripting for inventory is a plus." in out
    assert "Shifts are evenings and weekends." in out
    assert out.index("Python") < out.index("Shifts")  # original order
    assert "bistro" not in out
    assert comp.compress(POSTING, query="python developer, evenings", tokenizer=tok) == out


def test_extractive_keep_first_and_short_items(tok: Any) -> None:
    out = Extractive(max_tokens=100, keep_first=True).compress(
        POSTING, query="python", tokenizer=tok
    )
    assert out.startswith("Line cook wanted") and "Python" in out
    assert Extractive(max_tokens=1000).compress(POSTING, query="x", tokenizer=tok) == POSTING
    # No segment fits whole: the head of the best-matching one, never an empty item.
    tiny = Extractive(max_tokens=12).compress(POSTING, query="python", tokenizer=tok)
    assert tiny == "Experience w"


@pytest.mark.parametrize("budget", [3, 10, 25, 60])
def test_extractive_budget_holds(tok: Any, budget: int) -> None:
    out = Extractive(max_tokens=budget).compress(POSTING, query="salary lyon", tokenizer=tok)
    assert count_tokens(tok, out) <= budget


def test_segments_and_bm25() -> None:
    assert split_segments(POSTING)[-3:] == [
        "Location: Lyon |",
        "Salary: 2.4k EUR;",
        "Contract: permanent",
    ]
    docs = [words(s) for s in ["the python job", "the chef job", "python python python"]]
    scores = bm25(["python"], docs, k1=1.5, b=0.75)
    assert scores[1] == 0 and scores[2] > scores[0] > 0


@pytest.mark.parametrize(
    ("factory", "options", "error", "name"),
    [
        (Truncate, {"max_tokens": 0}, ValueError, "max_tokens"),
        (Truncate, {"max_tokens": "5"}, ValueError, "max_tokens"),
        (Truncate, {"mode": "middle"}, ValueError, "mode"),
        (Truncate, {"bogus": 1}, TypeError, "bogus"),
        (Extractive, {"max_tokens": -1}, ValueError, "max_tokens"),
        (Extractive, {"b": 2}, ValueError, "b must"),
        (Extractive, {"k1": "x"}, ValueError, "k1"),
        (Extractive, {"keep_first": "yes"}, ValueError, "keep_first"),
        (Extractive, {"top_k": 3}, TypeError, "top_k"),
    ],
)
def test_option_errors_name_the_option(
    factory: Any, options: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        factory(**options)


def test_a_chain_link_that_breaks_the_contract_is_named() -> None:
    """One string per item, or a RuntimeError naming the compressor: a short list zipped
    against the items would score the wrong text under an item's id."""
    from slmserve.compressors import run_chain
    from slmserve.interfaces import Compressor

    class Lossy(Compressor):
        name = "lossy"

        def compress(self, item: str, *, query: str, tokenizer: object) -> str:
            return item

        def compress_many(self, items, *, query, tokenizer):  # type: ignore[no-untyped-def]
            return list(items)[1:]

    with pytest.raises(RuntimeError, match="'lossy' returned 2 values of type str for 3"):
        run_chain([Lossy()], ["a", "b", "c"], "q", tokenizer=None)
    assert run_chain([], ["a"], "q", tokenizer=None) == ["a"]
