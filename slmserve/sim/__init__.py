"""Discrete-event simulator: the real engine core and schedulers on simulated time.

See ``docs/simulator.md``. The pieces:

* :mod:`slmserve.sim.simulator` — :func:`simulate` drives :class:`~slmserve.engine.core.EngineCore`
  (same admission, radix cache and scheduler objects as the server) with a :class:`CostModel`
  instead of a model; :func:`measure_capacity` defines "load 1.0".
* :mod:`slmserve.sim.workloads` — generators (k-LPM paper model, SGLang generated-shared-prefix,
  VTC suites, locality/fairness mix) and JSONL trace replay.
* :mod:`slmserve.sim.report` — metrics (TTFT percentiles, throughput, hit rate, service gap,
  Jain's index), JSON and plots.
* :mod:`slmserve.sim.cli` — ``slmserve simulate``.
"""

from slmserve.sim.report import Summary, summarize
from slmserve.sim.simulator import (
    CAPACITY_DEFINITION,
    CostModel,
    RequestRecord,
    SimConfig,
    SimRequest,
    SimResult,
    SimulationError,
    StepLog,
    measure_capacity,
    simulate,
)
from slmserve.sim.workloads import (
    WORKLOADS,
    TraceEntry,
    Workload,
    make_workload,
    read_trace,
    trace_workload,
    write_trace,
)

__all__ = [
    "CAPACITY_DEFINITION",
    "WORKLOADS",
    "CostModel",
    "RequestRecord",
    "SimConfig",
    "SimRequest",
    "SimResult",
    "SimulationError",
    "StepLog",
    "Summary",
    "TraceEntry",
    "Workload",
    "make_workload",
    "measure_capacity",
    "read_trace",
    "simulate",
    "summarize",
    "trace_workload",
    "write_trace",
]
