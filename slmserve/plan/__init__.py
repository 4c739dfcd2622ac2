"""Capacity planning: measure a replica, then pick instance types and counts by annealing.

See ``docs/planning.md``. The pieces:

* :mod:`slmserve.plan.measure` — ``slmserve bench profile``: the real engine at increasing load;
  :mod:`slmserve.plan.fit` fits the simulator's cost model to the measured step times;
  :mod:`slmserve.plan.profile` is the profile file (how, when and where it was measured).
* :mod:`slmserve.plan.catalog` — instance types with price, availability cap and a profile.
* :mod:`slmserve.plan.fleet` — a fleet's capacity and P99 (:class:`FleetEvaluator`; the
  simulator behind :class:`SplitSimFleet`).
* :mod:`slmserve.plan.objective`, :mod:`slmserve.plan.anneal`, :mod:`slmserve.plan.planner` —
  cost + shortfall + latency objective, simulated annealing, per-period plans.
* :mod:`slmserve.plan.exact` — brute force, dynamic programming and LP bound (to check against).
* :mod:`slmserve.plan.cli` — ``slmserve bench profile`` and ``slmserve plan``.
"""

from slmserve.plan.anneal import AnnealParams, AnnealResult, anneal
from slmserve.plan.catalog import Catalog, InstanceType, load_catalog
from slmserve.plan.fleet import FleetEvaluator, QueueingFleet, ReplicaType, SplitSimFleet
from slmserve.plan.objective import Evaluation, Problem, evaluate
from slmserve.plan.planner import PeriodPlan, Planner, PlanSettings
from slmserve.plan.profile import Profile, read_profile, write_profile
from slmserve.plan.workload import Shape, make_items

__all__ = [
    "AnnealParams",
    "AnnealResult",
    "Catalog",
    "Evaluation",
    "FleetEvaluator",
    "InstanceType",
    "PeriodPlan",
    "PlanSettings",
    "Planner",
    "Problem",
    "Profile",
    "QueueingFleet",
    "ReplicaType",
    "Shape",
    "SplitSimFleet",
    "anneal",
    "evaluate",
    "load_catalog",
    "make_items",
    "read_profile",
    "write_profile",
]
