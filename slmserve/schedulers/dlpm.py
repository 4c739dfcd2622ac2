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

from slmserve.hookspecs import hookimpl
from slmserve.interfaces import Scheduler
from slmserve.plugins import Registry
from slmserve.schedulers.lpm import ClientTally, WaitingIndex, lpm_sorted, number_option
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

    def _cost(self, r: SchedRequest) -> float:
        return self.input_price * (r.prompt_len - r.matched_len)

    def _refill(self, deficits: dict[str, float], clients: Sequence[str]) -> None:
        m = refills_needed([deficits[c] for c in clients], self.quantum)
        for c in clients:
            deficits[c] += m * self.quantum

    def order(self, waiting: Sequence[SchedRequest], now: float) -> list[SchedRequest]:
        ranked = lpm_sorted(waiting)
        queues: dict[str, list[int]] = {}
        for i, r in enumerate(ranked):
            queues.setdefault(r.client_id, []).append(i)
        appeared, vanished = self._waiting.resync(waiting)
        for c in appeared:
            self._activate(c)
        for c in vanished:
            self._idle(c)
        # The refill the previous rounds' charges made due, committed now.
        if queues and all(self.deficits[c] <= 0 for c in queues):
            self._refill(self.deficits, list(queues))
            self.refills += 1
        # Simulate the admission loop on a copy: pop the LPM-best request of an eligible client.
        tentative = {c: self.deficits[c] for c in queues}
        heads = dict.fromkeys(queues, 0)
        heap = [(q[0], c) for c, q in queues.items() if tentative[c] > 0]
        heapq.heapify(heap)
        out: list[SchedRequest] = []
        while len(out) < len(ranked):
            if not heap:  # nobody eligible but requests remain: DRR refill
                backlogged = [c for c, q in queues.items() if heads[c] < len(q)]
                self._refill(tentative, backlogged)
                heap = [(queues[c][heads[c]], c) for c in backlogged if tentative[c] > 0]
                heapq.heapify(heap)
                continue
            i, client = heapq.heappop(heap)
            r = ranked[i]
            out.append(r)
            tentative[client] -= self._cost(r)
            heads[client] += 1
            queue = queues[client]
            if heads[client] < len(queue) and tentative[client] > 0:
                heapq.heappush(heap, (queue[heads[client]], client))
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
