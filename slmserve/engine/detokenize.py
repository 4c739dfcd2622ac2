"""Incremental detokenization with stop strings.

Decoding tokens one at a time is wrong for byte-level and SentencePiece tokenizers: a
character may span several tokens (``"🙂"`` is four byte tokens), and decoders drop or add
spaces at the start of a sequence. Decoding the whole output every step is right but
quadratic. The prefix-offset / read-offset technique (from HF text-generation-inference and
vLLM) decodes a small window instead::

    ids:   ... | prefix_offset ......... read_offset ......... end |
    text emitted so far   = ... + decode(ids[prefix:read])   (already out)
    new text this step    = decode(ids[prefix:end]) minus decode(ids[prefix:read])

Both decodes start at the same token, so start-of-sequence effects cancel; text ending in
U+FFFD (an incomplete UTF-8 sequence) is held until the next tokens complete it. Once text is
emitted the window slides forward, and ids before it are dropped.

Stop strings are matched on the emitted text. Any tail that could still become a stop string
(the longest suffix that is a prefix of one) is held back, so a stop string never leaks even
when it spans tokens.
"""

from __future__ import annotations

import codecs
import contextlib
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5
"""Prompt tokens decoded in front of the first output tokens, so a leading space (e.g. a
SentencePiece ``▁word``) comes out as it would in the full text."""


class IncrementalDetokenizer:
    """Turns a request's output ids into text, a few tokens at a time, and finds stop strings.

    The emitted text equals ``tokenizer.decode(output_ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=False)`` (decoded after the prompt's last tokens), cut at the
    first stop string. Empty stop strings are ignored.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        *,
        stop: Sequence[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Fast tokenizers: call the Rust decoder directly. The Python wrapper's argument
        # normalisation costs ~40 µs per call, several times the decoding itself, and this runs
        # twice per generated token. (Its decode never cleans up spaces: same text.)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast_decode = backend.decode if backend is not None else None
        # Byte-level tokenizers (GPT-2 style: Qwen, Llama 3, the demo) need no decoder at all:
        # each token is a fixed byte string, and an incremental UTF-8 decoder holds back
        # incomplete characters exactly like the window technique, at a fraction of the cost.
        self._bytes = byte_table(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        # Skipped special tokens decode to nothing: dropping them on arrival keeps a run of
        # them (padding, repeated EOS) from widening the decode window.
        self._drop: frozenset[int] = special_ids(tokenizer) if skip_special_tokens else frozenset()
        self._stops = [s for s in stop if s]
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._include_stop = include_stop_str_in_output
        context = list(prompt_ids[-_PROMPT_CONTEXT:])
        if self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends inside a character: the output cannot complete it, so decoding
            # it as context would only swallow output text.
            context = []
        self._ids = context
        self._prefix = 0
        self._read = len(context)
        self._held = ""
        """Decoded text not emitted yet because it may be the start of a stop string."""
        self.text = ""
        """All text emitted so far."""
        self.stopped = False
        self.stop_str: str | None = None
        """The stop string that ended the output, if one did."""

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Append new output tokens; return the text safe to emit now and whether a stop
        string ended the output (after which further calls return ``("", True)``)."""
        if self.stopped:
            return "", True
        if self._bytes is not None:
            table, size = self._bytes, len(self._bytes)
            chunk = b"".join(table[t] for t in token_ids if t < size and t not in self._drop)
            return self._emit(self._utf8.decode(chunk), final=False)
        self._ids.extend(t for t in token_ids if t not in self._drop)
        return self._emit(self._decode_window(final=False), final=False)

    def flush(self) -> str:
        """At the end of generation (not by stop string): emit everything still held back,
        including a trailing incomplete character (as U+FFFD)."""
        if self.stopped:
            return ""
        if self._bytes is not None:
            text, _ = self._emit(self._utf8.decode(b"", final=True), final=True)
            return text
        text, _ = self._emit(self._decode_window(final=True), final=True)
        return text

    def _decode(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return cast(str, self._fast_decode(ids, skip_special_tokens=self._skip_special))
        text = self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )
        return cast(str, text)  # a list only for batched input

    def _decode_window(self, *, final: bool) -> str:
        """New text from the tokens after ``read_offset``; slides the window when it is final
        (not ending in an incomplete character)."""
        if len(self._ids) == self._read:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        return self._slide(prefix_text, new_text, final=final)

    def _slide(self, prefix_text: str, new_text: str, *, final: bool) -> str:
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        del self._ids[: self._prefix]
        self._read -= self._prefix
        self._prefix = 0
        return new_text[len(prefix_text) :]

    def _emit(self, new_text: str, *, final: bool) -> tuple[str, bool]:
        text = self._held + new_text
        hit = self._find_stop(text)
        if hit is not None:
            start, stop_str = hit
            out = text[: start + len(stop_str)] if self._include_stop else text[:start]
            self._held, self.stopped, self.stop_str = "", True, stop_str
        else:
            keep = len(text) - (0 if final else self._held_len(text))
            out, self._held = text[:keep], text[keep:]
        self.text += out
        return out, self.stopped

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that completes first in ``text`` (the earliest end, then the
        earliest start): what character-by-character streaming would have hit first."""
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = text.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _held_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0


def add_batch(
    detoks: Sequence[IncrementalDetokenizer], tokens: Sequence[int]
) -> list[tuple[str, bool]]:
    """``[d.add([t]) for d, t in zip(detoks, tokens)]`` with one Rust call for the whole step.

    The engine detokenizes every running request every step; one ``decode_batch`` over all the
    windows replaces two Python->Rust round trips per request. Falls back to ``add`` for
    tokenizers without a fast backend.
    """
    out: list[tuple[str, bool]] = [("", d.stopped) for d in detoks]
    batched: list[int] = []
    windows: list[list[int]] = []
    decode_batch = None
    skip = True
    for i, (d, t) in enumerate(zip(detoks, tokens)):
        if d.stopped:
            continue
        if d._bytes is not None or d._fast_decode is None:
            out[i] = d.add([t])
            continue
        if t not in d._drop:
            d._ids.append(t)
        if len(d._ids) == d._read:
            continue
        decode_batch = d._tokenizer.backend_tokenizer.decode_batch
        skip = d._skip_special
        batched.append(i)
        windows.append(d._ids[d._prefix : d._read])
        windows.append(d._ids[d._prefix :])
    if decode_batch is not None:
        texts = decode_batch(windows, skip_special_tokens=skip)
        for j, i in enumerate(batched):
            d = detoks[i]
            new = d._slide(texts[2 * j], texts[2 * j + 1], final=False)
            out[i] = d._emit(new, final=False)
    return out


_BYTE_TABLES: weakref.WeakKeyDictionary[Any, list[bytes] | None] = weakref.WeakKeyDictionary()
_SPECIAL_IDS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_ids(tokenizer: Any) -> frozenset[int]:
    """``tokenizer.all_special_ids`` as a set, computed once per tokenizer (it is slow)."""
    try:
        return _SPECIAL_IDS[tokenizer]
    except (KeyError, TypeError):
        ids = frozenset(tokenizer.all_special_ids)
    with contextlib.suppress(TypeError):
        _SPECIAL_IDS[tokenizer] = ids
    return ids


def byte_table(tokenizer: Any) -> list[bytes] | None:
    """Token id -> bytes for byte-level BPE tokenizers, else ``None`` (built once per tokenizer).

    Added tokens (specials) decode to their literal content, as the ByteLevel decoder does.
    """
    try:
        return _BYTE_TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    table = _build_byte_table(tokenizer)
    with contextlib.suppress(TypeError):  # tokenizers that cannot be weakly referenced
        _BYTE_TABLES[tokenizer] = table
    return table


def _build_byte_table(tokenizer: Any) -> list[bytes] | None:
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    vocab = backend.get_vocab(with_added_tokens=False)
    table = [b""] * (max([*vocab.values(), *added, -1]) + 1)
    for token, i in vocab.items():
        try:
            table[i] = bytes(byte_of[c] for c in token)
        except KeyError:
            return None  # not a byte-level vocabulary after all
    for i, content in added.items():
        table[i] = content.encode()
    return table


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level vocabularies."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}
