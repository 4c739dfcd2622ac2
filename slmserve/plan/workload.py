"""The workload shape a profile is measured on and a plan is made for.

A **request** carries ``items_per_request`` **items** (one item = one sequence: a prompt of
``prompt_tokens`` tokens and ``output_tokens`` generated tokens). Every item of a request starts
with the request's shared prefix (``shared_prefix`` of the prompt), then unique tokens. The
prefix comes from ``prefix_groups`` distinct prefixes (``1``: one system prompt for everyone;
``0``: a fresh prefix per request, i.e. a query shared only by its own items — the scoring
case). Throughput is counted in items/s, latency per request: arrival to its last item's end.

The same token arrays drive the real engine (``slmserve bench profile``) and the simulator
(``slmserve plan``), so a profile's measured points can be replayed in the simulator exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

import msgspec
import numpy as np

from slmserve.sim.simulator import RequestRecord, SimRequest

PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PrefixFraction = Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)]

TOKEN_HIGH = 2**31
"""Simulator token ids are drawn from ``[1, TOKEN_HIGH)``; only equality matters there."""


class Shape(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Per-request shape of the traffic; see the module docstring."""

    prompt_tokens: PosInt = 256
    shared_prefix: PrefixFraction = 0.5
    """Fraction of each prompt that is the request's shared prefix."""
    output_tokens: PosInt = 16
    items_per_request: PosInt = 1
    prefix_groups: NonNegInt = 1
    """Distinct shared prefixes; 0 gives every request its own."""

    @property
    def prefix_len(self) -> int:
        """Shared tokens per prompt; at least one token stays unique so items differ."""
        return min(round(self.shared_prefix * self.prompt_tokens), self.prompt_tokens - 1)

    @property
    def tokens_per_item(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class ItemWorkload:
    """Items of ``num_requests`` requests with Poisson arrivals at **one request per second**.

    ``at_rate`` rescales time, so every load level sees the same items in the same order
    (common random numbers: two fleets are compared on identical traffic).
    """

    shape: Shape
    items: list[SimRequest]
    request_of: dict[str, int]
    """Item id -> index of its request."""
    num_requests: int

    def at_rate(self, requests_per_s: float) -> list[SimRequest]:
        if not requests_per_s > 0:
            raise ValueError(f"rate must be > 0, got {requests_per_s}")
        scale = 1.0 / requests_per_s
        return [replace(r, arrival=r.arrival * scale) for r in self.items]

    def head(self, num_requests: int) -> list[SimRequest]:
        """The items of the first ``num_requests`` requests."""
        return [r for r in self.items if self.request_of[r.rid] < num_requests]


def make_items(
    shape: Shape, num_requests: int, *, seed: int = 0, vocab: int = TOKEN_HIGH
) -> ItemWorkload:
    """Draw ``num_requests`` requests of ``shape``; token ids in ``[1, vocab)``."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if vocab < 3:
        raise ValueError(f"vocab must be >= 3, got {vocab}")
    rng = np.random.default_rng(seed)
    plen, k = shape.prefix_len, shape.items_per_request
    ngroups = shape.prefix_groups or num_requests
    prefixes = rng.integers(1, vocab, size=(ngroups, plen), dtype=np.int64)
    group = rng.integers(0, ngroups, size=num_requests)
    if shape.prefix_groups == 0:
        group = np.arange(num_requests)
    arrivals = np.cumsum(rng.exponential(1.0, size=num_requests))
    suffixes = rng.integers(1, vocab, size=(num_requests, k, shape.prompt_tokens - plen))
    items, request_of = [], {}
    for j in range(num_requests):
        for i in range(k):
            rid = f"r{j}.{i}"
            prompt = np.concatenate([prefixes[group[j]], suffixes[j, i]])
            label = f"p{group[j]}"
            items.append(
                SimRequest(rid, float(arrivals[j]), prompt, shape.output_tokens, group=label)
            )
            request_of[rid] = j
    return ItemWorkload(shape, items, request_of, num_requests)


def request_latencies(
    records: list[RequestRecord], request_of: dict[str, int], n: int
) -> np.ndarray:
    """Per request: its last item's finish minus its arrival (``inf`` if an item never ended)."""
    finish = np.full(n, -np.inf)
    arrival = np.zeros(n)
    for rec in records:
        j = request_of[rec.rid]
        arrival[j] = rec.arrival
        end = np.inf if rec.finish is None else rec.finish
        finish[j] = max(finish[j], end)
    return finish - arrival
