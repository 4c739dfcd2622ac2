"""``truncate``: keep at most ``max_tokens`` tokens of the item (its head, or head and tail).

The baseline compressor: no model, no query, a hard cap. ``head_tail`` keeps both ends because
postings often put the title and the requirements first and location / salary last.
"""

from __future__ import annotations

from typing import Any, Literal

from slmserve.compressors import check_budget, count_tokens, token_ends
from slmserve.hookspecs import hookimpl
from slmserve.interfaces import Compressor
from slmserve.plugins import Registry

MODES = ("head", "head_tail")


class Truncate(Compressor):
    """Keep at most N tokens (head, or head + tail)."""

    name = "truncate"

    def __init__(
        self,
        *,
        max_tokens: int = 256,
        mode: Literal["head", "head_tail"] = "head",
        separator: str = " ... ",
    ) -> None:
        self.max_tokens = check_budget(max_tokens)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(separator, str):
            raise ValueError(f"separator must be a string, got {separator!r}")
        self.mode = mode
        self.separator = separator

    def compress(self, item: str, *, query: str, tokenizer: Any) -> str:
        ends = token_ends(tokenizer, item)
        if len(ends) <= self.max_tokens:
            return item
        if self.mode == "head":
            return _fit(item[: ends[self.max_tokens - 1]], self.max_tokens, tokenizer)
        room = self.max_tokens - count_tokens(tokenizer, self.separator)
        if room < 2:  # no room for both ends and the marker: fall back to the head
            return _fit(item[: ends[self.max_tokens - 1]], self.max_tokens, tokenizer)
        head_n, tail_n = (room + 1) // 2, room // 2
        head = item[: ends[head_n - 1]]
        tail = item[ends[len(ends) - tail_n - 1] :]
        return _fit(head + self.separator + tail, self.max_tokens, tokenizer, keep_end=True)


def _fit(text: str, budget: int, tokenizer: Any, *, keep_end: bool = False) -> str:
    """Trim a character at a time until ``text`` re-tokenizes within ``budget``: a cut on token
    boundaries almost always fits, but BPE merges across the cut may rarely add a token."""
    while text and count_tokens(tokenizer, text) > budget:
        text = text[1:] if keep_end else text[:-1]
    return text


@hookimpl
def slmserve_register_compressors(registry: Registry) -> None:
    registry.add(Truncate.name, Truncate, description="keep at most N tokens (head or head+tail)")
