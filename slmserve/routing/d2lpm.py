"""D²LPM, double-deficit longest prefix match (Cao et al., arXiv 2501.14312), as we read it.

DLPM (``slmserve/schedulers/dlpm.py``) keeps one replica both cache-friendly and fair: LPM
order inside deficit-round-robin quanta. D²LPM puts a second deficit layer in front of many
replicas: the router keeps a global prefix tree of what each replica holds and a deficit per
(client, replica); each replica still runs DLPM locally. The paper's Section 4 could not be
read (only its abstract), so this is the documented reading of our research notes
(``shared/research/schedulers.md`` §5.2), spelled out:

* **Locality**: a request goes to the replica holding the longest prefix of its prompt (ties:
  the less loaded, then registration order) *while the client's deficit there is positive*.
* **Spill**: otherwise (deficit spent, or nothing cached anywhere) it goes to the least
  loaded live replica among those where the client's deficit is positive (ties: the longer
  match, then registration order).
* **Refill**: when the client's deficit is spent on every live replica, each gets the quantum
  ``Q`` again — ``m`` quanta at once, the fewest that make one positive, as DLPM does.
  A (client, replica) pair starts with one quantum.
* **Charge** at routing time (the router must act before any response comes back):
  ``input_price × (prompt − tokens the chosen replica holds) + output_price × max_new_tokens``.
  A request that never reached its replica is refunded.
* **Global tree**: every routed prompt is inserted under its replica; a replica's share is
  trimmed LRU-first to 90% of ``cache_tokens`` whenever it exceeds ``cache_tokens`` (the
  router's model of that replica's KV cache). A replica that goes down loses its share.

What this buys: a client's traffic stays on the replica that caches its prefixes for a
quantum at a time, then the next quantum's worth spills to the least loaded replicas, so a
heavy client cannot pile onto one replica (its routed cost on any two replicas differs by less
than ``Q`` plus one request's charge), a hot prefix gets replicated to as many replicas as its
traffic needs, and every replica's local DLPM keeps the clients that do share it fair.

Not in our reading (the notes only guess at it): quanta scaled by each replica's load or
capacity. Our replicas are assumed equal.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from slmserve.hookspecs import hookimpl
from slmserve.plugins import Registry
from slmserve.routing.base import Outcome, Router, RouteRequest, number_option
from slmserve.routing.tree import PrefixTree

DEFAULT_QUANTUM = 32768.0
"""Our default (the paper's is not recovered): a few typical requests' cost per replica."""

TRIM_TO = 0.9
"""A replica's tree share over ``cache_tokens`` is trimmed to this fraction of it."""


class D2LPM(Router):
    """Best-matching replica while the client's deficit there lasts; spill by load after."""

    name = "d2lpm"

    def __init__(
        self,
        *,
        quantum: Any = DEFAULT_QUANTUM,
        input_price: Any = 1.0,
        output_price: Any = 2.0,
        cache_tokens: Any = 65_536,
        max_clients: Any = 100_000,
    ) -> None:
        """
        :param quantum: ``Q``, cost a client may route to one replica per round.
        :param input_price: cost per prompt token the chosen replica does not hold.
        :param output_price: cost per requested output token (``max_new_tokens``).
        :param cache_tokens: key units the router assumes each replica can cache.
        :param max_clients: clients whose deficits are kept (least recently seen dropped).
        """
        super().__init__()
        self.quantum = number_option("quantum", quantum, strict=True)
        if math.isinf(self.quantum):
            raise ValueError("router option 'quantum' must be finite")
        self.input_price = number_option("input_price", input_price)
        self.output_price = number_option("output_price", output_price)
        self.cache_tokens = int(number_option("cache_tokens", cache_tokens, minimum=1))
        self.max_clients = int(number_option("max_clients", max_clients, minimum=1))
        self.tree = PrefixTree()
        self.deficits: OrderedDict[str, dict[str, float]] = OrderedDict()
        """Client -> replica -> deficit (positive: it may still route there this round)."""
        self.charged: dict[str, dict[str, float]] = {}
        """Client -> replica -> total cost routed there (refunds subtracted)."""
        self.decisions = {"local": 0, "spill": 0, "cold": 0, "refill": 0}
        self.last_decision = ""
        self._charges: dict[str, float] = {}
        self._held: dict[str, int] = {}

    # ------------------------------------------------------------------ the rule

    def _client(self, client: str) -> dict[str, float]:
        q = self.deficits.get(client)
        if q is None:
            q = self.deficits[client] = {}
            if len(self.deficits) > self.max_clients:
                old, _ = self.deficits.popitem(last=False)
                self.charged.pop(old, None)
        else:
            self.deficits.move_to_end(client)
        for r in self.replicas:
            q.setdefault(r, self.quantum)  # a new (client, replica) pair starts with a quantum
        return q

    def choose(self, request: RouteRequest, live: list[str], now: float) -> str:
        q = self._client(request.client_id)
        held = self._held = self.tree.match(request.key).per_tenant
        load = self.load
        best = max(live, key=lambda r: (held.get(r, 0), -load[r]))
        if held.get(best, 0) > 0 and q[best] > 0:
            self.last_decision = "local"
            return best
        self.last_decision = "spill" if held.get(best, 0) > 0 else "cold"
        eligible = [r for r in live if q[r] > 0]
        if not eligible:
            self.refill(request.client_id, live)
            eligible = [r for r in live if q[r] > 0]
        return min(eligible, key=lambda r: (load[r], -held.get(r, 0)))

    def refill(self, client: str, live: list[str]) -> None:
        """Give every live replica ``m`` quanta, the fewest that make one deficit positive."""
        q = self.deficits[client]
        m = min(math.floor(-q[r] / self.quantum) for r in live) + 1
        for r in live:
            q[r] += m * self.quantum
        self.decisions["refill"] += 1

    def charge(self, request: RouteRequest, held: int) -> float:
        """What a request costs its client on a replica holding ``held`` of its prompt."""
        uncached = len(request.key) - held
        return self.input_price * uncached + self.output_price * request.max_new_tokens

    # ------------------------------------------------------------------ bookkeeping

    def on_routed(self, request: RouteRequest, replica: str, now: float) -> None:
        self.decisions[self.last_decision] += 1
        cost = self.charge(request, self._held.get(replica, 0))
        self._charges[request.rid] = cost
        self.deficits[request.client_id][replica] -= cost
        per = self.charged.setdefault(request.client_id, {})
        per[replica] = per.get(replica, 0.0) + cost
        self.tree.insert(request.key, replica)
        if self.tree.size(replica) > self.cache_tokens:
            self.tree.evict(replica, int(TRIM_TO * self.cache_tokens))

    def on_finished(
        self, request: RouteRequest, replica: str, outcome: Outcome, now: float
    ) -> None:
        cost = self._charges.pop(request.rid, 0.0)
        if not outcome.ok:  # never served: give the client its deficit back
            q = self.deficits.get(request.client_id)
            if q is not None:
                q[replica] += cost
            per = self.charged.get(request.client_id)
            if per is not None:
                per[replica] -= cost

    def on_replica_down(self, name: str) -> None:
        self.tree.remove_tenant(name)

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        return {
            "tree_size": {r: float(self.tree.size(r)) for r in self.replicas},
            "decisions": {k: float(v) for k, v in self.decisions.items()},
        }


@hookimpl
def slmserve_register_routers(registry: Registry) -> None:
    registry.add(
        D2LPM.name, D2LPM, description="double-deficit LPM: locality within per-replica quanta"
    )
