"""Deficit Longest Prefix Match (DLPM; Cao et al., arXiv 2501.14312): LPM inside DRR quanta.

LPM maximises prefix reuse but lets a client with cold prompts starve; VTC is fair but ignores
locality. DLPM is deficit round robin whose "visit order" is LPM: every client has a deficit
``q``; the round's order is LPM among requests of clients with ``q > 0``; admitting a request
spends its cost; when no waiting client has a positive deficit, every backlogged client gets the
quantum ``Q`` again. A client's prefix-sharing requests thus go back to back until its quantum
runs out (locality), and no client gets more than about one quantum ahead (fairness). Large
``Q`` tends to LPM, ``Q = inf`` is exactly LPM; small ``Q`` tends to per-request round robin.

Our reading of the parts the notes leave open (the paper's Algorithm 1 was not available):

* **Cost**: ``input_price`` per prompt token actually computed (uncached) plus ``output_price``
  per generated token, charged per step from the engine's reports (chunks as they run).
* **Refill**: only when no client with waiting requests has ``q > 0``; only clients with
  waiting requests are refilled; ``m`` refills at once (the least that makes some client
  positive), which is what ``m`` empty DRR passes would do. Since every refilled client had
  ``q <= 0``, ``q <= Q`` always holds.
* **No banking**: a client seen with no waiting requests keeps no positive credit
  (``q := min(q, 0)``), as classic DRR resets an emptied flow. Debt is kept, so work a client
  received while it was running but not waiting still counts against it.
* **Activation**: a client whose queue goes from empty to non-empty gets one quantum,
  ``q := min(q, 0) + Q``, like a flow that DRR appends to its active list and serves when its
  turn comes. Without this a newcomer would wait until every other client spent its quantum,
  forever when ``Q = inf``, and ``Q -> inf`` would not be LPM. Leftover credit is dropped on
  idling and debt is kept, so an idle/return cycle buys at most one quantum, what a
  backlogged client gets per refill.
* **Rounds**: the engine admits a prefix of our order, so ``order`` simulates the admission
  loop with tentative deficits (including the refills a long batch would trigger) and commits
  nothing; real deficits change by the reported charges in ``on_step`` and by refills at the
  start of the next ``order`` call, when the real state says nobody is eligible. Deferring a
  refill does not change who is ahead: it adds the same amount to every backlogged client.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from slmserve.config import number_option
from slmserve.hookspecs import hookimpl
from slmserve.interfaces import Scheduler
from slmserve.plugins import Registry
from slmserve.schedulers.lpm import ClientTally, WaitingIndex, client_queues, lpm_sorted
from slmserve.types import SchedRequest, StepReport

DEFAULT_QUANTUM = 2048.0
"""Our default, not the paper's (not recovered): a few typical small-model requests' cost."""


def refills_needed(deficits: Sequence[float], quantum: float) -> int:
    """Fewest refills of ``quantum`` that make some deficit positive (all are <= 0)."""
    if math.isinf(quantum):
        return 1
    return min(math.floor(-q / quantum) for q in deficits) + 1


class DLPM(Scheduler):
    """Deficit longest prefix match: LPM among clients whose deficit is positive."""

    name = "dlpm"

    def __init__(
        self,
        *,
        quantum: Any = DEFAULT_QUANTUM,
        input_price: Any = 1.0,
        output_price: Any = 2.0,
    ) -> None:
        """
        :param quantum: ``Q``, service added to each backlogged client per refill (``inf``: LPM).
        :param input_price: cost per computed (uncached) prompt token.
        :param output_price: cost per generated token.
        """
        self.quantum = number_option("quantum", quantum, strict=True, finite=False)
        self.input_price = number_option("input_price", input_price)
        self.output_price = number_option("output_price", output_price)
        self.deficits: dict[str, float] = {}
        self.refills = 0
        """Refill events so far (each may add several quanta at once)."""
        self._waiting = WaitingIndex()
        self._service: defaultdict[str, float] = defaultdict(float)
        self._tally = ClientTally()

    def _activate(self, client: str) -> None:
        self.deficits[client] = min(self.deficits.get(client, 0.0), 0.0) + self.quantum

    def _idle(self, client: str) -> None:
        self.deficits[client] = min(self.deficits.get(client, 0.0), 0.0)

    def on_arrival(self, request: SchedRequest, now: float) -> None:
        if self._waiting.add(request):
            self._activate(request.client_id)

    def order(self, waiting: Sequence[SchedRequest], now: float) -> list[SchedRequest]:
        appeared, vanished = self._waiting.resync(waiting)
        for c in appeared:
            self._activate(c)
        for c in vanished:
            self._idle(c)
        ranked = lpm_sorted(waiting)
        clients, owner, queues = client_queues(ranked)
        # The refill the previous rounds' charges made due, committed now.
        if clients and all(self.deficits[c] <= 0 for c in clients):
            m = refills_needed([self.deficits[c] for c in clients], self.quantum)
            for c in clients:
                self.deficits[c] += m * self.quantum
            self.refills += 1
        return self._simulate(ranked, owner, queues, list(clients))

    def _simulate(
        self,
        ranked: list[SchedRequest],
        owner: list[int],
        queues: list[list[int]],
        clients: list[str],
    ) -> list[SchedRequest]:
        """The admission loop on tentative deficits.

        A heap holds each eligible client's best remaining position in ``ranked``; since each
        client's positions are already in LPM order, the heap top is the LPM-best eligible
        request. O(n log #clients), with a closed-form refill when the heap runs dry.
        """
        price, quantum = self.input_price, self.quantum
        cost = [price * (len(r.tokens) - r.matched_len) for r in ranked]
        tentative = [self.deficits[c] for c in clients]
        heads = [0] * len(clients)
        heap: list[int] = []
        out: list[SchedRequest] = []
        emit, replace, pop = out.append, heapq.heapreplace, heapq.heappop
        while len(out) < len(ranked):
            if not heap:  # (re)build the heap of eligible clients, refilling if none is
                backlogged = [ci for ci, q in enumerate(queues) if heads[ci] < len(q)]
                if all(tentative[ci] <= 0 for ci in backlogged):
                    m = refills_needed([tentative[ci] for ci in backlogged], quantum)
                    for ci in backlogged:
                        tentative[ci] += m * quantum
                heap = [queues[ci][heads[ci]] for ci in backlogged if tentative[ci] > 0]
                heapq.heapify(heap)
                continue
            pos = heap[0]
            ci = owner[pos]
            emit(ranked[pos])
            left = tentative[ci] = tentative[ci] - cost[pos]
            head = heads[ci] = heads[ci] + 1
            queue = queues[ci]
            if head < len(queue) and left > 0:
                replace(heap, queue[head])
            else:
                pop(heap)
        return out

    def on_step(self, report: StepReport) -> None:
        self._tally.add(report)
        for client, prompt_tokens, output_tokens in report.computed.values():
            cost = self.input_price * prompt_tokens + self.output_price * output_tokens
            self.deficits[client] = self.deficits.get(client, 0.0) - cost
            self._service[client] += cost
        # Charge first, then drop leftover credit of clients whose queue just emptied.
        for rid in (*report.admitted, *report.finished):
            left = self._waiting.remove(rid)
            if left is not None and left[2]:
                self._idle(left[0])

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        return {
            **self._tally.stats(),
            "dlpm_deficit": dict(self.deficits),
            "service_tokens": dict(self._service),
        }


@hookimpl
def slmserve_register_schedulers(registry: Registry) -> None:
    registry.add(DLPM.name, DLPM, description="deficit longest prefix match (fair LPM)")
