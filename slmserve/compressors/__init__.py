"""Built-in context compressors: shorten a scoring item's text before it is tokenized.

Scoring cost grows with the item's tokens (the query prefix is shared through the cache), so
cutting items is the cheapest throughput lever left once prefix sharing works. Each compressor
is a plugin registered through ``slmserve_register_compressors``; a request names one, or a
list to chain them (``[extractive, truncate]``: pick the relevant sentences, then hard-cap).

The helpers below count and cut by *tokens of the serving model*, so a budget means the same
thing the model will see, whatever the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmserve.interfaces import Compressor


def run_chain(
    compressors: Sequence[Compressor], texts: Sequence[str], query: str, tokenizer: Any
) -> list[str]:
    """Every text through the chain, one batch per link. A link that does not hand back one
    string per text is a plugin bug, and a ``RuntimeError`` naming it: zipping a short list
    against the items would score the wrong text under an item's id."""
    out = list(texts)
    for compressor in compressors:
        got = compressor.compress_many(out, query=query, tokenizer=tokenizer)
        if len(got) != len(out) or not all(isinstance(t, str) for t in got):
            kinds = sorted({type(t).__name__ for t in got})
            raise RuntimeError(
                f"compressor {compressor.name!r} returned {len(got)} values of type "
                f"{', '.join(kinds) or '-'} for {len(out)} items (one string per item is the "
                "contract)"
            )
        out = list(got)
    return out


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids without special tokens (through the Rust tokenizer when there is one: the
    Python wrapper costs ~10x more per call and compressors call this per sentence)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(encode(tokenizer, text)) if text else 0


def token_ends(tokenizer: Any, text: str) -> list[int]:
    """Character offset where each token ends, so text can be cut on token boundaries without
    a decode round trip (which would not reproduce the original text byte for byte)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [end for _, end in backend.encode(text, add_special_tokens=False).offsets]
    # Slow path (no offsets): the shortest prefix whose decoded length covers each token.
    ids = encode(tokenizer, text)
    return [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]


def check_budget(value: Any, option: str = "max_tokens") -> int:
    """A positive int option, or ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value!r}")
    return value
