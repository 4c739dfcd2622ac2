"""``extractive``: keep the sentences (or fields) of an item that best match the query.

Query-aware and model-free: the item is split into segments (sentences, lines, ``;``/``|``
separated fields), each segment is ranked against the query with BM25 computed over the
item's own segments, and the best ones are kept until ``max_tokens`` is spent — then put back
in their original order, so the model still reads a coherent (if shorter) posting. Pure
Python and deterministic: ties go to the earlier segment, no randomness, no global state.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from slmserve.compressors import check_budget, count_tokens, token_ends
from slmserve.hookspecs import hookimpl
from slmserve.interfaces import Compressor
from slmserve.plugins import Registry

_BOUNDARY = re.compile(r"(?<=[.!?])\s+|(?<=[;|])|\n+")
"""A sentence ends at ``.!?`` followed by whitespace (so ``3.5k`` stays whole), a field after
``;`` or ``|`` or at a line break."""
_WORD = re.compile(r"\w+")


def split_segments(text: str) -> list[str]:
    """Sentences and fields of ``text``, each with its trailing delimiter, empty ones dropped."""
    return [s.strip() for s in _BOUNDARY.split(text) if s.strip()]


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def bm25(query: list[str], docs: list[list[str]], *, k1: float, b: float) -> list[float]:
    """Okapi BM25 of ``query`` against each of ``docs`` (IDF from ``docs`` themselves, with the
    ``+1`` inside the log so a term in every segment still scores non-negatively)."""
    n = len(docs)
    avg = sum(map(len, docs)) / n if n else 0.0
    df = Counter(t for d in docs for t in set(d))
    terms = set(query)
    out = []
    for d in docs:
        tf = Counter(d)
        norm = k1 * (1 - b + b * len(d) / avg) if avg else k1
        out.append(
            sum(
                math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * tf[t] * (k1 + 1) / (tf[t] + norm)
                for t in terms
                if tf[t]
            )
        )
    return out


class Extractive(Compressor):
    """Keep the sentences that best match the query (BM25) within a token budget."""

    name = "extractive"

    def __init__(
        self,
        *,
        max_tokens: int = 128,
        k1: float = 1.5,
        b: float = 0.75,
        keep_first: bool = False,
        separator: str = " ",
    ) -> None:
        self.max_tokens = check_budget(max_tokens)
        for option, value in (("k1", k1), ("b", b)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{option} must be a non-negative number, got {value!r}")
        if not 0 <= b <= 1:
            raise ValueError(f"b must be between 0 and 1, got {b!r}")
        if not isinstance(keep_first, bool):
            raise ValueError(f"keep_first must be true or false, got {keep_first!r}")
        if not isinstance(separator, str):
            raise ValueError(f"separator must be a string, got {separator!r}")
        self.k1, self.b = float(k1), float(b)
        self.keep_first = keep_first
        """Always keep the first segment (a posting's title) if it fits."""
        self.separator = separator

    def compress(self, item: str, *, query: str, tokenizer: Any) -> str:
        if count_tokens(tokenizer, item) <= self.max_tokens:
            return item
        segments = split_segments(item)
        scores = bm25(words(query), [words(s) for s in segments], k1=self.k1, b=self.b)
        ranked = sorted(range(len(segments)), key=lambda i: (-scores[i], i))
        if self.keep_first and segments:
            ranked.remove(0)
            ranked.insert(0, 0)
        sep_cost = count_tokens(tokenizer, self.separator)
        kept: list[int] = []
        used = 0
        for i in ranked:
            cost = count_tokens(tokenizer, segments[i]) + (sep_cost if kept else 0)
            if used + cost <= self.max_tokens:
                kept.append(i)
                used += cost
        text = self.separator.join(segments[i] for i in sorted(kept))
        # Joined text can tokenize a little differently from the pieces: drop the weakest
        # kept segment until the whole fits.
        while kept and count_tokens(tokenizer, text) > self.max_tokens:
            kept.pop()
            text = self.separator.join(segments[i] for i in sorted(kept))
        if not text and ranked:
            # No whole segment fits: the head of the best one beats an empty item.
            best = segments[ranked[0]]
            ends = token_ends(tokenizer, best)
            text = best[: ends[min(self.max_tokens, len(ends)) - 1]]
            while text and count_tokens(tokenizer, text) > self.max_tokens:
                text = text[:-1]
        return text


@hookimpl
def slmserve_register_compressors(registry: Registry) -> None:
    registry.add(
        Extractive.name,
        Extractive,
        description="query-aware: keep the best BM25 sentences within N tokens",
    )
