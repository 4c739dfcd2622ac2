"""Round robin: the live replicas in turn, blind to prefixes and load (the baseline)."""

from __future__ import annotations

from slmserve.hookspecs import hookimpl
from slmserve.plugins import Registry
from slmserve.routing.base import Router, RouteRequest


class RoundRobin(Router):
    """Each request to the next live replica after the previous choice."""

    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def choose(self, request: RouteRequest, live: list[str], now: float) -> str:
        # Walk the registration order from the cursor, so a replica coming back keeps its turn.
        n = len(self.replicas)
        for step in range(n):
            name = self.replicas[(self._next + step) % n]
            if name in self.live:
                self._next = (self._next + step + 1) % n
                return name
        raise AssertionError("choose() called without a live replica")


@hookimpl
def slmserve_register_routers(registry: Registry) -> None:
    registry.add(RoundRobin.name, RoundRobin, description="live replicas in turn")
