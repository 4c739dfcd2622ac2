"""Engine log-probabilities -> the two OpenAI wire shapes (legacy completions, chat).

The engine reports ids; clients want token text. Token text comes from
:meth:`Serving.token_text` (cached per id), so formatting costs a few dict lookups per token.
"""

from __future__ import annotations

from collections.abc import Iterable

from slmserve.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from slmserve.server.serving import Serving
from slmserve.types import TokenLogprob


def add_completion_logprobs(
    serving: Serving,
    out: CompletionLogprobs,
    entries: Iterable[tuple[int, TokenLogprob | None]],
    offset: int,
) -> int:
    """Append ``(token id, logprob or None)`` entries to ``out``; return the new text offset.

    ``None`` marks a position without a log-probability (the first prompt token). The sampled
    token is always in its position's ``top_logprobs`` (as in OpenAI's and vLLM's output).
    ``text_offset`` counts characters of the token texts, from the start of the choice text.
    """
    for token_id, lp in entries:
        text = serving.token_text(token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {serving.token_text(t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append(top)
    return offset


def sampled_entries(logprobs: Iterable[TokenLogprob] | None) -> list[tuple[int, TokenLogprob]]:
    return [(lp.token_id, lp) for lp in logprobs or ()]


def prompt_entries(
    ids: list[int], logprobs: list[TokenLogprob | None] | None
) -> list[tuple[int, TokenLogprob | None]]:
    """Prompt positions: the engine's list starts with ``None`` for the first token."""
    lps = list(logprobs or ())
    lps += [None] * (len(ids) - len(lps))
    return list(zip(ids, lps))


def chat_logprobs(serving: Serving, logprobs: Iterable[TokenLogprob]) -> list[ChatTokenLogprob]:
    """The chat shape: one object per sampled token with its top alternatives."""
    out = []
    for lp in logprobs:
        text = serving.token_text(lp.token_id)
        top = []
        for token_id, value in lp.top:
            alt = serving.token_text(token_id)
            top.append(TopLogprob(token=alt, logprob=value, bytes=list(alt.encode())))
        out.append(
            ChatTokenLogprob(
                token=text, logprob=lp.logprob, bytes=list(text.encode()), top_logprobs=top
            )
        )
    return out
