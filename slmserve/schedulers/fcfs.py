"""First come, first served: admission in arrival order (ties broken by request id)."""

from __future__ import annotations

from collections.abc import Sequence

from slmserve.hookspecs import hookimpl
from slmserve.interfaces import Scheduler
from slmserve.plugins import Registry
from slmserve.types import SchedRequest


class FCFS(Scheduler):
    """First come, first served."""

    name = "fcfs"
    uses_prefix_match = False

    def order(self, waiting: Sequence[SchedRequest], now: float) -> list[SchedRequest]:
        return sorted(waiting, key=lambda r: (r.arrival_time, r.rid))


@hookimpl
def slmserve_register_schedulers(registry: Registry) -> None:
    registry.add(FCFS.name, FCFS, description="first come, first served")
