"""Least load: the live replica with the fewest requests in flight (join the shortest queue)."""

from __future__ import annotations

from slmserve.hookspecs import hookimpl
from slmserve.plugins import Registry
from slmserve.routing.base import Router, RouteRequest, least_loaded


class LeastLoad(Router):
    """Fewest in-flight requests; ties go to the earliest registered replica."""

    name = "least_load"

    def choose(self, request: RouteRequest, live: list[str], now: float) -> str:
        return least_loaded(live, self.load)


@hookimpl
def slmserve_register_routers(registry: Registry) -> None:
    registry.add(LeastLoad.name, LeastLoad, description="fewest requests in flight")
