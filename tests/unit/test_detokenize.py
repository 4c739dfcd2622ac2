"""Incremental detokenization: multi-byte characters, stop strings, bounded decode windows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from slmserve.engine.detokenize import IncrementalDetokenizer, add_batch

TEXT = "héllo 世界 🙂"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, as the ByteLevel pre-tokenizer uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = dict(zip(printable, map(chr, printable))), 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


B2U = _bytes_to_unicode()


def _sym(text: str) -> str:
    return "".join(B2U[b] for b in text.encode())


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: ids 0..255 are the bytes, then merges that split characters oddly.

    ``"hé"`` becomes ``h + 0xC3`` and ``0xA9``, so a token ends inside ``é``; ``世`` is one
    token, ``界`` and ``🙂`` stay raw bytes; ``"stop"`` and ``"ll"`` are merged tokens.
    """
    vocab = {B2U[b]: b for b in range(256)}
    e_acute, world = _sym("é"), _sym("世")
    merges = [
        (_sym("h"), e_acute[0]),  # a token that ends inside "é"
        (_sym("l"), _sym("l")),
        (_sym("ll"), _sym("o")),
        (_sym("s"), _sym("t")),
        (_sym("o"), _sym("p")),
        (_sym("st"), _sym("op")),
        (_sym(" "), _sym("w")),
        (world[0], world[1]),
        (world[:2], world[2]),
    ]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


TOK = _byte_tokenizer()
EOS = TOK.eos_token_id
PROMPT = TOK.encode("Say: ")


def one_shot(ids: list[int], skip_special_tokens: bool = True) -> str:
    return TOK.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(
    ids: list[int], chunks: list[int] | None = None, **kwargs
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed ``ids`` in chunks of the given sizes (1 by default); flush unless stopped."""
    kwargs.setdefault("stop", [])
    det = IncrementalDetokenizer(TOK, PROMPT, **kwargs)
    pieces, i, sizes = [], 0, iter(chunks or [])
    while i < len(ids):
        n = next(sizes, 1)
        text, stopped = det.add(ids[i : i + n])
        pieces.append(text)
        i += n
        if stopped:
            break
    if not det.stopped:
        pieces.append(det.flush())
    assert "".join(pieces) == det.text
    return det, pieces


def test_tokenizer_splits_characters_across_tokens() -> None:
    ids = TOK.encode(TEXT)
    assert one_shot(ids) == TEXT
    assert "\ufffd" in one_shot(ids[:1])  # "h" + half of "é"
    assert len(ids) > len(TEXT)


def test_multibyte_characters_are_emitted_only_when_complete() -> None:
    ids = TOK.encode(TEXT)
    det, pieces = stream(ids)
    assert det.text == TEXT
    # The first token is "h" + half of "é": at most "h" comes out, never half a character.
    assert pieces[0] in ("", "h")
    assert "".join(pieces[:2]) == "hé"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 4  # the bytes of 界 and 🙂 wait too


ids_strategy = st.lists(st.integers(0, len(TOK) - 1), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ids=ids_strategy, chunks=st.lists(st.integers(1, 4)), skip=st.booleans())
def test_incremental_equals_one_shot_without_stops(
    ids: list[int], chunks: list[int], skip: bool
) -> None:
    """Any ids (random bytes make invalid UTF-8 too), any chunking: same text as one decode."""
    det, _ = stream(ids, chunks, skip_special_tokens=skip)
    assert det.text == one_shot(ids, skip)
    assert not det.stopped


def test_decode_windows_stay_small() -> None:
    """Never re-decode the whole output: each decode sees a handful of tokens."""
    seen: list[int] = []

    class Spy:
        all_special_ids = TOK.all_special_ids

        def decode(self, ids: list[int], **kwargs: object) -> str:
            seen.append(len(ids))
            return TOK.decode(ids, **kwargs)

    ids = TOK.encode(TEXT * 20) + [EOS] * 30 + TOK.encode(TEXT)
    det = IncrementalDetokenizer(Spy(), PROMPT, stop=[])  # type: ignore[arg-type]
    for t in ids:
        det.add([t])
    det.flush()
    assert det.text == TEXT * 21
    assert max(seen) <= 8


def test_special_tokens() -> None:
    ids = [*TOK.encode("hi"), EOS]
    assert stream(ids)[0].text == "hi"
    assert stream(ids, skip_special_tokens=False)[0].text == "hi<eos>"


# --- stop strings -------------------------------------------------------------------------


def test_stop_string_spanning_tokens_is_not_leaked() -> None:
    ids = TOK.encode("hello world")
    det, pieces = stream(ids, stop=["o wor"])
    assert det.stopped and det.stop_str == "o wor"
    assert det.text == "hell"
    assert "".join(pieces) == "hell"


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    det = IncrementalDetokenizer(TOK, PROMPT, stop=["world"])
    assert det.add(TOK.encode("hello wor")) == ("hello ", False)
    assert det.add(TOK.encode("m")) == ("worm", False)
    assert det.add(TOK.encode(" wo")) == (" ", False)
    assert det.flush() == "wo"
    assert det.text == "hello worm wo"


def test_stop_string_at_the_first_token() -> None:
    det = IncrementalDetokenizer(TOK, PROMPT, stop=["stop"])
    assert det.add(TOK.encode("stop")) == ("", True)
    assert det.add(TOK.encode("more")) == ("", True)
    assert det.flush() == ""
    assert det.text == ""
    # "h" sits in the first token together with half of "é": the stop is found at the first
    # or second token, and nothing is emitted either way.
    det, pieces = stream(TOK.encode(TEXT), stop=["h"])
    assert det.stopped and set(pieces) == {""} and len(pieces) <= 2


def test_include_stop_str_in_output() -> None:
    det, _ = stream(TOK.encode("say stop now"), stop=["stop"], include_stop_str_in_output=True)
    assert det.stopped and det.text == "say stop"


def test_several_stop_strings_first_completed_wins() -> None:
    ids = TOK.encode("abcdef")
    # "cd" completes before "bcde" and "ef", whatever the chunking.
    for chunks in ([1] * 6, [6], [3, 3]):
        det, _ = stream(ids, chunks, stop=["ef", "bcde", "cd"])
        assert det.text == "ab" and det.stop_str == "cd"
    # Same end: the one starting earlier (the shorter output).
    det, _ = stream(ids, [6], stop=["d", "bcd"])
    assert det.text == "a" and det.stop_str == "bcd"


def test_stop_string_with_multibyte_characters() -> None:
    det, pieces = stream(TOK.encode(TEXT), stop=["世界"])
    assert det.text == "héllo " and "".join(pieces) == "héllo "
    det, _ = stream(TOK.encode(TEXT), stop=["🙂"], include_stop_str_in_output=True)
    assert det.text == TEXT


def test_empty_stop_strings_are_ignored() -> None:
    det, _ = stream(TOK.encode("abc"), stop=[""])
    assert det.text == "abc" and not det.stopped


def _reference_stop(text: str, stops: list[str], include: bool) -> str:
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        return text
    end, start, _ = min(hits)
    return text[:end] if include else text[:start]


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="ab 世🙂", max_size=30),
    stops=st.lists(st.text(alphabet="ab 世🙂", min_size=1, max_size=4), max_size=3),
    chunks=st.lists(st.integers(1, 5)),
    include=st.booleans(),
)
def test_stop_strings_match_reference(
    text: str, stops: list[str], chunks: list[int], include: bool
) -> None:
    det, pieces = stream(TOK.encode(text), chunks, stop=stops, include_stop_str_in_output=include)
    assert det.text == _reference_stop(text, stops, include)
    assert det.stopped == any(s in text for s in stops)
    assert all("\ufffd" not in p for p in pieces)


# --- context from the prompt --------------------------------------------------------------


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style: the decoder drops the space of the first ``▁word``."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_prompt_context_keeps_the_leading_space(
    metaspace_tokenizer: PreTrainedTokenizerFast,
) -> None:
    assert metaspace_tokenizer.decode([2, 3]) == "world!"
    det = IncrementalDetokenizer(metaspace_tokenizer, [1], stop=[])
    assert det.add([2]) == (" world", False)
    assert det.add([3]) == ("!", False)
    assert det.flush() == ""


@settings(max_examples=30, deadline=None)
@given(
    texts=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5),
    stops=st.lists(st.text(min_size=1, max_size=3), max_size=2),
)
def test_add_batch_equals_one_at_a_time(texts: list[str], stops: list[str]) -> None:
    """The engine's batched path emits exactly what per-request ``add`` would."""
    ids = [TOK.encode(t, add_special_tokens=False) for t in texts]
    single = [IncrementalDetokenizer(TOK, [65], stop=stops) for _ in ids]
    batched = [IncrementalDetokenizer(TOK, [65], stop=stops) for _ in ids]
    for step in range(max(map(len, ids))):
        live = [i for i, seq in enumerate(ids) if step < len(seq)]
        want = [single[i].add([ids[i][step]]) for i in live]
        got = add_batch([batched[i] for i in live], [ids[i][step] for i in live])
        assert got == want
    assert [d.text for d in batched] == [d.text for d in single]


def test_byte_level_fast_path_is_used_and_matches_the_window_path() -> None:
    from slmserve.engine.detokenize import byte_table

    assert byte_table(TOK) is not None
    ids = TOK.encode("héllo 世界 🙂 stop")
    fast = IncrementalDetokenizer(TOK, PROMPT, stop=["lo 世"])
    slow = IncrementalDetokenizer(TOK, PROMPT, stop=["lo 世"])
    slow._bytes = None  # force the decode-window path
    for t in ids:
        fast.add([t])
        slow.add([t])
    assert fast.text == slow.text == "hél"
