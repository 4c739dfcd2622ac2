"""Multi-replica routing: policies (one module each), their prefix tree, and the proxy.

* :mod:`slmserve.routing.base` — the :class:`Router` interface both the proxy and the cluster
  simulator drive; load and in-flight bookkeeping.
* :mod:`slmserve.routing.tree` — the multi-tenant approximate radix tree (which replica was
  sent which prefix).
* Policies, registered through ``slmserve_register_routers`` like a third-party one:
  ``round_robin``, ``least_load``, ``cache_aware`` (SGLang's router rule) and ``d2lpm``
  (double-deficit LPM, our reading of the DLPM paper's distributed algorithm).
* :mod:`slmserve.routing.proxy` and :mod:`slmserve.routing.cli` — ``slmserve route``.

See ``docs/routing.md``.
"""

from slmserve.routing.base import NoReplicaError, Outcome, Router, RouteRequest

__all__ = ["NoReplicaError", "Outcome", "RouteRequest", "Router"]
