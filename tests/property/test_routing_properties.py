"""Hypothesis properties of the routing policies (``docs/routing.md``).

Random operation sequences — requests from a few clients over keys drawn from a tiny alphabet
(so prefixes collide), finishes, replicas going down and coming back — drive each policy
directly, and every decision is checked against the rule it claims to follow, computed from the
state just before the decision.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from slmserve.plugins import PluginManager
from slmserve.routing.base import NoReplicaError, Outcome, Router, RouteRequest
from slmserve.routing.cache_aware import CacheAware
from slmserve.routing.d2lpm import D2LPM

REPLICAS = ["r0", "r1", "r2", "r3"]
PM = PluginManager(load_entrypoints=False)

keys = st.lists(st.integers(1, 3), min_size=1, max_size=8)
op = st.one_of(
    st.tuples(st.just("route"), keys, st.integers(0, 2), st.integers(0, 8)),
    st.tuples(st.just("finish"), st.integers(0, 10_000), st.booleans()),
    st.tuples(st.just("down"), st.integers(0, 3)),
    st.tuples(st.just("up"), st.integers(0, 3)),
)
ops = st.lists(op, min_size=1, max_size=80)


def drive(router: Router, program: list[tuple[Any, ...]], check: Any = None) -> None:
    """Run ``program`` on ``router``; ``check(router, request, choice, before)`` per route."""
    router.set_replicas(REPLICAS)
    inflight: list[str] = []
    n = 0
    for step in program:
        kind = step[0]
        if kind == "route":
            _, key, client, out = step
            req = RouteRequest(f"q{n}", np.asarray(key, np.int64), f"c{client}", out)
            n += 1
            live = set(router.live)
            before = snapshot(router, req)
            try:
                choice = router.route(req, float(n))
            except NoReplicaError:
                assert not live
                continue
            assert choice in live, f"{choice} is not live ({sorted(live)})"
            inflight.append(req.rid)
            if check is not None:
                check(router, req, choice, before)
        elif kind == "finish" and inflight:
            rid = inflight.pop(step[1] % len(inflight))
            router.finish(rid, float(n), Outcome(ok=step[2]))
        elif kind == "down":
            router.mark_down(REPLICAS[step[1]])
        elif kind == "up":
            router.mark_up(REPLICAS[step[1]])
        expected = dict.fromkeys(REPLICAS, 0)
        for rid in inflight:
            expected[router.replica_of(rid)] += 1  # type: ignore[index]
        assert router.load == expected


def snapshot(router: Router, req: RouteRequest) -> dict[str, Any]:
    out: dict[str, Any] = {"load": dict(router.load), "live": router.live_replicas()}
    tree = getattr(router, "tree", None)
    if tree is not None:
        out["match"] = tree.match(req.key)
        out["sizes"] = {r: tree.size(r) for r in REPLICAS}
    if isinstance(router, D2LPM):
        out["q"] = dict(router.deficits.get(req.client_id, dict.fromkeys(REPLICAS, router.quantum)))
    return out


@settings(max_examples=60, deadline=None)
@given(program=ops, name=st.sampled_from(sorted(PM.routers.names())))
def test_every_request_goes_to_exactly_one_live_replica(program: list[Any], name: str) -> None:
    drive(PM.routers.get(name)(), program)


@settings(max_examples=150, deadline=None)
@given(
    program=ops,
    threshold=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
    abs_t=st.integers(0, 3),
    rel_t=st.sampled_from([1.0, 1.1, 2.0]),
)
def test_cache_aware_follows_its_rule(
    program: list[Any], threshold: float, abs_t: int, rel_t: float
) -> None:
    def check(router: Router, req: RouteRequest, choice: str, before: dict[str, Any]) -> None:
        load, live = before["load"], before["live"]
        hi, lo = max(load[r] for r in live), min(load[r] for r in live)
        if hi - lo > abs_t and hi > rel_t * lo:
            assert load[choice] == lo
        else:
            match = before["match"]
            owners = [t for t in match.deepest if t in live]
            if match.length / len(req.key) > threshold and owners:
                assert choice == owners[0]
            else:
                assert before["sizes"][choice] == min(before["sizes"][r] for r in live)
        assert router.tree.match(req.key).per_tenant[choice] == len(req.key)  # type: ignore[attr-defined]
        router.tree.check()  # type: ignore[attr-defined]

    router = CacheAware(
        cache_threshold=threshold, balance_abs_threshold=abs_t, balance_rel_threshold=rel_t
    )
    drive(router, program, check)


@settings(max_examples=150, deadline=None)
@given(program=ops, quantum=st.sampled_from([1, 5, 20, 1000]), cache=st.integers(2, 30))
def test_d2lpm_spills_only_after_the_deficit_is_spent(
    program: list[Any], quantum: int, cache: int
) -> None:
    def check(router: Router, req: RouteRequest, choice: str, before: dict[str, Any]) -> None:
        assert isinstance(router, D2LPM)
        live, load, q = before["live"], before["load"], before["q"]
        held = before["match"].per_tenant
        best = max(live, key=lambda r: (held.get(r, 0), -load[r]))
        if choice != best and held.get(best, 0) > 0:
            assert q[best] <= 0, "spilled away from its best match with deficit left"
            assert router.last_decision == "spill"
        if router.last_decision == "local":
            assert choice == best and q[best] > 0
        if router.last_decision in ("spill", "cold"):
            post = dict(q)
            if all(q[r] <= 0 for r in live):  # the refill this decision had to do
                m = min(math.floor(-q[r] / quantum) for r in live) + 1
                post = {r: v + m * quantum for r, v in q.items()}
            assert post[choice] > 0
            assert load[choice] == min(load[r] for r in live if post[r] > 0)
        assert router.tree.size(choice) <= router.cache_tokens  # trimmed after the insert
        router.tree.check()

    drive(D2LPM(quantum=quantum, cache_tokens=cache), program, check)


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(
        st.tuples(keys, st.integers(0, 2), st.integers(0, 8)), min_size=1, max_size=120
    ),
    quantum=st.sampled_from([1, 5, 20, 100]),
    finish_every=st.integers(1, 5),
)
def test_d2lpm_bounds_each_clients_service_gap_across_replicas(
    requests: list[tuple[list[int], int, int]], quantum: int, finish_every: int
) -> None:
    """With a fixed live set, the cost a client routed to any two replicas differs by less
    than one quantum plus one request's largest charge, however skewed its prefixes."""
    router = D2LPM(quantum=quantum, output_price=2)
    router.set_replicas(REPLICAS)
    largest = 0.0
    for i, (key, client, out) in enumerate(requests):
        req = RouteRequest(f"q{i}", np.asarray(key, np.int64), f"c{client}", out)
        largest = max(largest, len(key) + 2 * out)
        router.route(req)
        if i % finish_every == 0:
            router.finish(req.rid)
        for routed in router.charged.values():
            values = [routed.get(r, 0.0) for r in REPLICAS]
            assert max(values) - min(values) < quantum + largest + 1e-9
