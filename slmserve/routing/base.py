"""What a routing policy is: the interface the proxy and the cluster simulator both drive.

A router picks, for each incoming request, one replica among those currently live. The same
policy object runs in ``slmserve route`` (real replicas behind an aiohttp proxy) and in
:func:`slmserve.sim.cluster.simulate_cluster` (simulated replicas), so a result in the
simulator is a result about the shipped policy.

The base class owns what every policy needs and must get right the same way: the replica set
and which replicas are live, the load of each replica (requests routed to it and not finished:
SGLang's router uses the same measure), and the bookkeeping of in-flight requests so that
``finish`` can tell the policy what happened. A policy implements only :meth:`Router.choose`
and, optionally, the ``on_*`` hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from slmserve import config
from slmserve.types import DEFAULT_CLIENT


class NoReplicaError(RuntimeError):
    """No live replica can take the request."""


@dataclass(slots=True)
class RouteRequest:
    """What a router may read about one request.

    ``key`` identifies the prompt for prefix matching: its token ids, or character codes when
    the router only has the text (:func:`slmserve.routing.tree.text_key`). Costs are counted
    in the key's units.
    """

    rid: str
    key: np.ndarray
    client_id: str = DEFAULT_CLIENT
    max_new_tokens: int = 16


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a routed request ended, as far as the caller knows."""

    ok: bool = True
    """False: the replica never served it (connection refused, replica died): no service."""
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None


class Router(ABC):
    """Chooses a live replica per request; counts load; hears how requests end.

    Contract:

    * :meth:`route` is called once per attempt; it returns one of the live replicas and counts
      the request as in flight there. :meth:`finish` is called exactly once per routed attempt
      (``Outcome(ok=False)`` when it never reached the replica, before a retry elsewhere).
    * ``choose`` must return a member of ``live`` and must be deterministic given the state.
    * ``now`` is seconds (wall clock in the proxy, simulated time in the simulator).
    """

    name: ClassVar[str]
    """Registry name (``--policy NAME``)."""

    def __init__(self) -> None:
        self.replicas: list[str] = []
        self.live: set[str] = set()
        self.load: dict[str, int] = {}
        """Requests routed to each replica and not finished yet."""
        self.routed: dict[str, int] = {}
        """Requests ever routed to each replica."""
        self._inflight: dict[str, tuple[str, RouteRequest]] = {}

    # ------------------------------------------------------------------ replicas

    def add_replica(self, name: str) -> None:
        """Register a replica (live). Adding a known one just marks it live."""
        if name not in self.load:
            self.replicas.append(name)
            self.load[name] = 0
            self.routed[name] = 0
        self.mark_up(name)

    def set_replicas(self, names: Sequence[str]) -> None:
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique, got {list(names)}")
        for name in names:
            self.add_replica(name)

    def mark_down(self, name: str) -> None:
        """Take a replica out of rotation (failed health check or connection)."""
        if name in self.live:
            self.live.discard(name)
            self.on_replica_down(name)

    def mark_up(self, name: str) -> None:
        if name not in self.load:
            raise KeyError(f"unknown replica {name!r}")
        self.live.add(name)

    def live_replicas(self) -> list[str]:
        """Live replicas in registration order (the order ties are broken in)."""
        return [r for r in self.replicas if r in self.live]

    # ------------------------------------------------------------------ requests

    def route(self, request: RouteRequest, now: float = 0.0) -> str:
        """Pick a live replica for ``request`` and count it in flight there."""
        if request.rid in self._inflight:
            raise ValueError(f"request {request.rid!r} is already in flight")
        live = self.live_replicas()
        if not live:
            raise NoReplicaError("no live replica")
        choice = self.choose(request, live, now)
        if choice not in self.live:
            raise RuntimeError(f"router {self.name!r} chose {choice!r}, not a live replica")
        self._inflight[request.rid] = (choice, request)
        self.load[choice] += 1
        self.routed[choice] += 1
        self.on_routed(request, choice, now)
        return choice

    def finish(self, rid: str, now: float = 0.0, outcome: Outcome | None = None) -> None:
        """The attempt ``rid`` ended (served, failed, or never reached the replica)."""
        replica, request = self._inflight.pop(rid)
        self.load[replica] -= 1
        self.on_finished(request, replica, outcome or Outcome(), now)

    def replica_of(self, rid: str) -> str | None:
        entry = self._inflight.get(rid)
        return entry[0] if entry else None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # ------------------------------------------------------------------ the policy

    @abstractmethod
    def choose(self, request: RouteRequest, live: list[str], now: float) -> str:
        """Return one member of ``live`` (non-empty, in registration order)."""

    def on_routed(self, request: RouteRequest, replica: str, now: float) -> None:  # noqa: B027
        """After ``route`` counted the request. Default: nothing."""

    def on_finished(  # noqa: B027
        self, request: RouteRequest, replica: str, outcome: Outcome, now: float
    ) -> None:
        """After ``finish``. Default: nothing."""

    def on_replica_down(self, name: str) -> None:  # noqa: B027
        """A replica left the rotation. Default: nothing."""

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        """Policy counters for ``/metrics``: ``{series: {label: value}}``."""
        return {}


def least_loaded(live: Sequence[str], load: Mapping[str, int]) -> str:
    """The live replica with the fewest requests in flight; ties: registration order."""
    return min(live, key=lambda r: load[r])


def number_option(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> float:
    """A real-valued router option: the shared validator, router wording, infinity allowed."""
    return config.number_option(
        name, value, minimum=minimum, strict=strict, finite=False, kind="router"
    )
