"""Virtual Token Counter (Sheng et al., OSDI 2024), following the authors' artifact.

Each client has a counter of the (weighted) service it received. Admission repeatedly takes the
oldest waiting request of the client with the smallest counter; the counter grows by
``input_price * input tokens / weight`` when a request is admitted and by
``output_price / weight`` per generated token, step by step. Between two clients that stay
backlogged the service difference is bounded by a constant that does not grow with time.

Rules copied from ``VTC-artifact/slora/server/router/vtc_req_queue.py``:

* **Lift**: when a client's waiting queue goes from empty to non-empty, its counter becomes
  ``max(own, min(counters of the other clients with waiting requests))``; with no other client
  waiting it is left alone. An idle client thus cannot bank service and then monopolise.
* **Round order**: the artifact's admission loop charges each admitted request before choosing
  the next, so one round's order already reflects the counters rising within the round. We
  build the same order with a heap of tentative counters and let the engine admit a prefix of
  it (break semantics, as in the artifact). The real counters change only in ``on_step``.
* Ties between equal counters go to the client whose oldest waiting request is oldest (the
  artifact uses dict insertion order, i.e. the client seen first).

``input_charge="full"`` (the default, as in the artifact) charges the whole input length when
the request is admitted, cached or not; ``"computed"`` charges the prompt tokens the engine
reports as computed in each step (uncached, chunk by chunk), the same service measure DLPM
uses, for comparisons on equal terms.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from slmserve.config import choice_option, number_option
from slmserve.hookspecs import hookimpl
from slmserve.interfaces import Scheduler
from slmserve.plugins import Registry
from slmserve.schedulers.lpm import ClientTally, WaitingIndex, client_queues, fcfs_sorted
from slmserve.types import SchedRequest, StepReport


def weights_option(value: Any) -> dict[str, float]:
    """``{client: weight}``, or ``"a:1,b:2"`` from the command line; weights must be > 0."""
    if isinstance(value, str):
        pairs = [item.split(":", 1) for item in value.split(",") if item.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"scheduler option 'weights' must look like 'a:1,b:2', got {value!r}")
        value = {k.strip(): v for k, v in pairs}
    if not isinstance(value, Mapping):
        raise ValueError(f"scheduler option 'weights' must be a mapping, got {value!r}")
    return {str(c): number_option(f"weights[{c!r}]", w, strict=True) for c, w in value.items()}


class VTC(Scheduler):
    """Virtual Token Counter: least-served client first, counters lifted on re-entry."""

    name = "vtc"

    def __init__(
        self,
        *,
        input_price: Any = 1.0,
        output_price: Any = 2.0,
        weights: Any = None,
        input_charge: str = "full",
    ) -> None:
        """
        :param input_price: cost of one input token (``w_p``).
        :param output_price: cost of one generated token (``w_q``).
        :param weights: ``{client: weight}``; a client's counter advances by cost / weight, so
            weight 2 gets twice the service. Unlisted clients weigh 1.
        :param input_charge: ``"full"`` (artifact) or ``"computed"`` (uncached tokens only).
        """
        self.input_price = number_option("input_price", input_price)
        self.output_price = number_option("output_price", output_price)
        self.weights = weights_option(weights or {})
        self.input_charge = choice_option("input_charge", input_charge, ("full", "computed"))
        self.counters: dict[str, float] = {}
        self._service: defaultdict[str, float] = defaultdict(float)
        self._waiting = WaitingIndex()
        self._tally = ClientTally()

    def _weight(self, client: str) -> float:
        return self.weights.get(client, 1.0)

    def _lift(self, client: str, backlogged: Iterable[str]) -> None:
        """``c_u := max(c_u, min of the other backlogged clients' counters)``."""
        others = [self.counters.get(c, 0.0) for c in backlogged if c != client]
        own = self.counters.setdefault(client, 0.0)
        if others:
            self.counters[client] = max(own, min(others))

    def on_arrival(self, request: SchedRequest, now: float) -> None:
        if self._waiting.add(request):
            self._lift(request.client_id, self._waiting.backlogged())

    def order(self, waiting: Sequence[SchedRequest], now: float) -> list[SchedRequest]:
        appeared, _ = self._waiting.resync(waiting)
        backlogged = self._waiting.backlogged() - appeared
        for client in sorted(appeared):
            self._lift(client, backlogged)
        fcfs = fcfs_sorted(waiting)
        clients, owner, queues = client_queues(fcfs)
        # What admitting each request adds to its client's counter (what on_step will charge).
        scale = [self.input_price / self._weight(c) for c in clients]
        if self.input_charge == "full":
            cost = [scale[ci] * len(r.tokens) for r, ci in zip(fcfs, owner)]
        else:
            cost = [scale[ci] * (len(r.tokens) - r.matched_len) for r, ci in zip(fcfs, owner)]
        # Heap of (tentative counter, FCFS rank of the client's head, client): the least
        # counter first, ties to the client whose oldest waiting request is oldest.
        heads = [0] * len(clients)
        heap = [(self.counters.get(c, 0.0), queues[ci][0], ci) for c, ci in clients.items()]
        heapq.heapify(heap)
        out: list[SchedRequest] = []
        while heap:
            counter, pos, ci = heap[0]
            out.append(fcfs[pos])
            head = heads[ci] = heads[ci] + 1
            queue = queues[ci]
            if head < len(queue):
                heapq.heapreplace(heap, (counter + cost[pos], queue[head], ci))
            else:
                heapq.heappop(heap)
        return out

    def on_step(self, report: StepReport) -> None:
        self._tally.add(report)
        full = self.input_charge == "full"
        for rid in report.admitted:
            left = self._waiting.remove(rid)
            if full and left is not None:
                self._charge(left[0], self.input_price * left[1])
        for rid in report.finished:
            self._waiting.remove(rid)
        for client, prompt_tokens, output_tokens in report.computed.values():
            cost = self.output_price * output_tokens
            if not full:
                cost += self.input_price * prompt_tokens
            self._charge(client, cost)

    def _charge(self, client: str, cost: float) -> None:
        if cost:
            self.counters[client] = self.counters.get(client, 0.0) + cost / self._weight(client)
            self._service[client] += cost

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        return {
            **self._tally.stats(),
            "vtc_counter": dict(self.counters),
            "service_tokens": dict(self._service),
        }


@hookimpl
def slmserve_register_schedulers(registry: Registry) -> None:
    registry.add(VTC.name, VTC, description="Virtual Token Counter fair scheduling (VTC)")
