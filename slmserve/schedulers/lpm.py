"""Longest prefix match (LPM), as SGLang's ``--schedule-policy lpm`` does it, or idealised.

LPM admits the waiting request with the longest cached prefix first: that request is the cheapest
to prefill, and taking requests in that order keeps a hot subtree of the radix cache busy while
it is resident. The engine refreshes ``matched_len`` every round, so the key is never stale.

SGLang adds two heuristics that matter for a faithful reproduction (``mode="sglang"``):

* **Queue-length fallback**: with more than ``fallback_queue_len`` (128) waiting requests the
  round is plain FCFS, because matching and sorting a long queue was too slow (SGLang PR #1896).
  Under overload "SGLang LPM" therefore *is* FCFS.
* **In-batch de-prioritisation**: when several waiting requests share a prefix that is not yet
  cached, admitting them together computes the prefix once per request. Only the first keeps its
  place; a request whose ``matched_len <= check_threshold`` and whose first
  ``in_batch_threshold`` tokens equal those of an earlier kept candidate goes to the back, so it
  hits the cache next round.

``mode="ideal"`` turns both off: the order is exactly ``(-matched_len, arrival_time, rid)``.

This module also holds the few helpers the other built-in policies share (sort keys, option
checks, per-client token tallies), so each policy module stays one screen long.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter
from typing import Any

from slmserve.config import choice_option, int_option
from slmserve.hookspecs import hookimpl
from slmserve.interfaces import Scheduler
from slmserve.plugins import Registry
from slmserve.types import SchedRequest, StepReport

SGLANG_FALLBACK_QUEUE_LEN = 128
"""SGLang switches LPM to FCFS above this many waiting requests."""
SGLANG_IN_BATCH_THRESHOLD = 32
"""``IN_BATCH_PREFIX_CACHING_DEPRIORITIZE_THRESHOLD``: shared leading tokens that count."""
SGLANG_CHECK_THRESHOLD = 32
"""``IN_BATCH_PREFIX_CACHING_CHECK_THRESHOLD``: only requests matching at most this are checked."""

_arrival = attrgetter("arrival_time")
_rid = attrgetter("rid")
_matched = attrgetter("matched_len")


def fcfs_sorted(waiting: Iterable[SchedRequest]) -> list[SchedRequest]:
    """Requests by ``(arrival_time, rid)``.

    Two stable sorts on single attributes (rid, then arrival time) give the same order as one
    sort on the tuple, without building a tuple per request: about 40% faster at 8k requests.
    """
    return sorted(sorted(waiting, key=_rid), key=_arrival)


def lpm_sorted(waiting: Iterable[SchedRequest]) -> list[SchedRequest]:
    """Requests by ``(-matched_len, arrival_time, rid)``.

    ``sorted(reverse=True)`` keeps equal keys in their original order, so sorting the arrival
    order by ``matched_len`` leaves ties in arrival order. No Python key function runs.
    """
    return sorted(fcfs_sorted(waiting), key=_matched, reverse=True)


def client_queues(
    ordered: Sequence[SchedRequest],
) -> tuple[dict[str, int], list[int], list[list[int]]]:
    """Split an ordered queue by client, as positions into ``ordered``.

    Returns ``(client -> index, owner index per position, positions per client index)``; each
    client's positions keep the given order. Indices let the fair policies run their loops on
    lists of ints instead of dicts keyed by strings.
    """
    clients: dict[str, int] = {}
    owner = [clients.setdefault(r.client_id, len(clients)) for r in ordered]
    queues: list[list[int]] = [[] for _ in clients]
    for pos, ci in enumerate(owner):
        queues[ci].append(pos)
    return clients, owner, queues


# ---------------------------------------------------------------------------- option checks


class ClientTally:
    """Raw per-client token counts (prompt tokens computed, output tokens), for ``stats()``."""

    def __init__(self) -> None:
        self.prompt: defaultdict[str, float] = defaultdict(float)
        self.output: defaultdict[str, float] = defaultdict(float)

    def add(self, report: StepReport) -> None:
        for client, prompt_tokens, output_tokens in report.computed.values():
            self.prompt[client] += prompt_tokens
            self.output[client] += output_tokens

    def stats(self) -> dict[str, dict[str, float]]:
        return {"prompt_tokens": dict(self.prompt), "output_tokens": dict(self.output)}


class WaitingIndex:
    """Which requests each client has waiting, kept up to date from the scheduler callbacks.

    Fair policies act when a client's queue *becomes* empty or non-empty (VTC's lift, DLPM's
    activation and no-banking). That has to be seen when it happens: the engine does not call
    ``order`` while nothing waits, so comparing one ``order`` call with the next misses idle
    periods. Stores each request's input length on arrival, because the engine's token list
    grows as the request decodes.
    """

    def __init__(self) -> None:
        self.queues: dict[str, dict[str, int]] = {}
        self.client_of: dict[str, str] = {}

    def add(self, r: SchedRequest) -> bool:
        """Record a waiting request; True if its client had nothing waiting before."""
        queue = self.queues.setdefault(r.client_id, {})
        was_empty = not queue
        queue[r.rid] = r.prompt_len
        self.client_of[r.rid] = r.client_id
        return was_empty

    def remove(self, rid: str) -> tuple[str, int, bool] | None:
        """Forget a request that left the queue: ``(client, input length, queue now empty)``."""
        client = self.client_of.pop(rid, None)
        if client is None:
            return None
        queue = self.queues[client]
        length = queue.pop(rid, 0)
        return client, length, not queue

    def backlogged(self) -> set[str]:
        return {c for c, q in self.queues.items() if q}

    def resync(self, waiting: Sequence[SchedRequest]) -> tuple[set[str], set[str]]:
        """Adopt the engine's queue as the truth; return the clients that (appeared, vanished).

        Requests aborted while waiting may never be reported. O(n), and a no-op when the index
        already agrees, which is the normal case.
        """
        known = self.client_of
        if len(waiting) == len(known) and all(map(known.__contains__, map(_rid, waiting))):
            return set(), set()
        before = self.backlogged()
        self.queues, self.client_of = {}, {}
        for r in waiting:
            self.add(r)
        after = self.backlogged()
        return after - before, before - after


# ---------------------------------------------------------------------------- the policy

_UNSET: Any = object()


class LPM(Scheduler):
    """Longest prefix match first (SGLang's heuristics optional)."""

    name = "lpm"

    def __init__(
        self,
        *,
        mode: str = "sglang",
        fallback_queue_len: int | None = _UNSET,
        in_batch_threshold: int | None = _UNSET,
        check_threshold: int = SGLANG_CHECK_THRESHOLD,
    ) -> None:
        """``mode`` sets the defaults; an explicit option overrides them.

        :param mode: ``"sglang"`` (fallback 128, in-batch threshold 32) or ``"ideal"`` (neither).
        :param fallback_queue_len: above this many waiting requests the round is FCFS;
            ``0``/``None`` disables the fallback.
        :param in_batch_threshold: shared leading tokens that de-prioritise a request;
            ``0``/``None`` disables in-batch de-prioritisation.
        :param check_threshold: only requests with ``matched_len`` at most this are checked.
        """
        self.mode = choice_option("mode", mode, ("sglang", "ideal"))
        sglang = self.mode == "sglang"
        if fallback_queue_len is _UNSET:
            fallback_queue_len = SGLANG_FALLBACK_QUEUE_LEN if sglang else None
        if in_batch_threshold is _UNSET:
            in_batch_threshold = SGLANG_IN_BATCH_THRESHOLD if sglang else None
        self.fallback_queue_len = _zero_is_off("fallback_queue_len", fallback_queue_len)
        self.in_batch_threshold = _zero_is_off("in_batch_threshold", in_batch_threshold)
        self.check_threshold = int_option("check_threshold", check_threshold, minimum=0)
        self._tally = ClientTally()
        self.fallback_rounds = 0
        """Rounds served in FCFS order because the queue was longer than the fallback."""

    def order(self, waiting: Sequence[SchedRequest], now: float) -> list[SchedRequest]:
        if self.fallback_queue_len is not None and len(waiting) > self.fallback_queue_len:
            self.fallback_rounds += 1
            return fcfs_sorted(waiting)
        ranked = lpm_sorted(waiting)
        if self.in_batch_threshold is None:
            return ranked
        return deprioritize_in_batch(ranked, self.in_batch_threshold, self.check_threshold)

    def on_step(self, report: StepReport) -> None:
        self._tally.add(report)

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        return self._tally.stats()


def _zero_is_off(name: str, value: Any) -> int | None:
    """A non-negative int option where ``0`` or ``None`` means "feature off"."""
    if value is None:
        return None
    return int_option(name, value, minimum=0) or None


def deprioritize_in_batch(
    ranked: list[SchedRequest], threshold: int, check_threshold: int
) -> list[SchedRequest]:
    """Move requests that would recompute a peer's uncached prefix behind everyone else.

    SGLang inserts each kept candidate into a throw-away radix tree and asks whether a later
    candidate matches at least ``threshold`` tokens of it. "Shares at least ``threshold``
    leading tokens" is the same as "has the same first ``threshold`` tokens", so a set of
    ``threshold``-token tuples answers it exactly, in O(threshold) per candidate.

    Candidates are visited in LPM order (SGLang visits its queue order), so the request kept is
    the one admitted first anyway; the others keep their relative LPM order at the back.
    """
    seen: set[tuple[int, ...]] = set()
    kept: list[SchedRequest] = []
    moved: list[SchedRequest] = []
    for r in ranked:
        if r.matched_len <= check_threshold and len(r.tokens) >= threshold:
            head = tuple(r.tokens[:threshold])
            if head in seen:
                moved.append(r)
                continue
            seen.add(head)
        kept.append(r)
    kept.extend(moved)
    return kept


@hookimpl
def slmserve_register_schedulers(registry: Registry) -> None:
    registry.add(LPM.name, LPM, description="longest prefix match first (SGLang LPM)")
