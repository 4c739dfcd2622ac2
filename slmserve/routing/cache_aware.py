"""SGLang's ``cache_aware`` router rule (``sgl-router``, ``policies/cache_aware.rs``).

The rule, per request, with ``load`` = requests in flight per replica::

    imbalanced := max(load) - min(load) > balance_abs_threshold
                  and max(load) > balance_rel_threshold * min(load)
    if imbalanced:                      choose the least loaded replica
    else:
        (matched, w) := tree.prefix_match(key)      # deepest node any replica holds
        if matched / len(key) > cache_threshold:    choose w
        else:                                       choose the replica with the smallest tree
    tree.insert(key, choice)
    every eviction_interval seconds: trim every replica's tree to max_tree_size (LRU leaves)

Where we differ, and why:

* SGLang's tree stores characters; ours stores whatever the key holds (token ids when the
  proxy or simulator has them, character codes otherwise). ``max_tree_size`` counts those units.
* ``prefix_match`` in SGLang returns the *first* tenant of the deepest node (hash-map order);
  we take the most recently used one (then registration order) so runs are deterministic.
* SGLang computes max/min load over all workers, healthy or not; we use the live ones (a dead
  replica's load cannot drain and would trigger load-balancing mode for ever).
* Defaults are the library's ``CacheAwareConfig::default()`` (0.5, 32, 1.1, 30 s); the CLI
  of some versions uses 0.3 / 64 / 1.5 / 120 s — pass them as options to compare.
  ``max_tree_size`` defaults to 2**26 (the CLI's), i.e. effectively no trimming.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slmserve.hookspecs import hookimpl
from slmserve.plugins import Registry
from slmserve.routing.base import Router, RouteRequest, least_loaded, number_option
from slmserve.routing.tree import PrefixTree


class CacheAware(Router):
    """Longest approximate prefix match while load is balanced; shortest queue otherwise."""

    name = "cache_aware"

    def __init__(
        self,
        *,
        cache_threshold: Any = 0.5,
        balance_abs_threshold: Any = 32,
        balance_rel_threshold: Any = 1.1,
        eviction_interval: Any = 30.0,
        max_tree_size: Any = 2**26,
    ) -> None:
        """
        :param cache_threshold: match rate above which the best-matching replica is chosen.
        :param balance_abs_threshold: load spread (requests) that may count as imbalance.
        :param balance_rel_threshold: ratio max/min load that may count as imbalance.
        :param eviction_interval: seconds between trims of the trees (0: never trim).
        :param max_tree_size: key units each replica's tree keeps after a trim.
        """
        super().__init__()
        self.cache_threshold = number_option("cache_threshold", cache_threshold)
        if self.cache_threshold > 1:
            raise ValueError(f"router option 'cache_threshold' must be <= 1, got {cache_threshold}")
        self.balance_abs_threshold = number_option("balance_abs_threshold", balance_abs_threshold)
        self.balance_rel_threshold = number_option("balance_rel_threshold", balance_rel_threshold)
        self.eviction_interval = number_option("eviction_interval", eviction_interval)
        self.max_tree_size = int(number_option("max_tree_size", max_tree_size))
        self.tree = PrefixTree()
        self._last_eviction: float | None = None
        self.decisions = {"balance": 0, "cache_hit": 0, "cache_miss": 0}
        """How often each branch of the rule was taken."""
        self.last_decision = ""

    def add_replica(self, name: str) -> None:
        super().add_replica(name)
        self.tree.insert([], name)  # as SGLang: an empty tree, so it can be the smallest

    def imbalanced(self, live: list[str]) -> bool:
        loads = [self.load[r] for r in live]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo

    def choose(self, request: RouteRequest, live: list[str], now: float) -> str:
        self._maybe_evict(now)
        if self.imbalanced(live):
            self.last_decision = "balance"
            return least_loaded(live, self.load)
        key = request.key
        match = self.tree.match(key)
        rate = match.length / len(key) if len(key) else 0.0
        owners = [t for t in match.deepest if t in self.live]
        if rate > self.cache_threshold and owners:
            self.last_decision = "cache_hit"
            return owners[0]
        self.last_decision = "cache_miss"
        return min(live, key=lambda r: self.tree.size(r))

    def on_routed(self, request: RouteRequest, replica: str, now: float) -> None:
        self.decisions[self.last_decision] += 1
        self.tree.insert(request.key, replica)

    def on_replica_down(self, name: str) -> None:
        self.tree.remove_tenant(name)
        self.tree.insert([], name)

    def _maybe_evict(self, now: float) -> None:
        if self.eviction_interval <= 0:
            return
        if self._last_eviction is None:
            self._last_eviction = now
        elif now - self._last_eviction >= self.eviction_interval:
            self._last_eviction = now
            for replica in self.replicas:
                self.tree.evict(replica, self.max_tree_size)

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        return {
            "tree_size": {r: float(self.tree.size(r)) for r in self.replicas},
            "decisions": {k: float(v) for k, v in self.decisions.items()},
        }


@hookimpl
def slmserve_register_routers(registry: Registry) -> None:
    registry.add(
        CacheAware.name, CacheAware, description="SGLang router: prefix match unless imbalanced"
    )
