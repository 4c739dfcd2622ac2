"""Routing policies, their prefix tree, the hook, and the cluster simulator, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from slmserve.interfaces import PluginError
from slmserve.plugins import PluginManager
from slmserve.routing.base import NoReplicaError, Outcome, RouteRequest
from slmserve.routing.cache_aware import CacheAware
from slmserve.routing.d2lpm import D2LPM
from slmserve.routing.least_load import LeastLoad
from slmserve.routing.round_robin import RoundRobin
from slmserve.routing.tree import PrefixTree, text_key
from slmserve.schedulers.dlpm import DLPM
from slmserve.schedulers.fcfs import FCFS
from slmserve.sim import SimConfig, make_workload, simulate
from slmserve.sim.cluster import ReplicaSpec, simulate_cluster, summarize_cluster
from slmserve.sim.simulator import CostModel, SimRequest


def rq(rid: str, key: list[int], client: str = "c", out: int = 0) -> RouteRequest:
    return RouteRequest(rid, np.asarray(key, np.int64), client_id=client, max_new_tokens=out)


# ---------------------------------------------------------------------------- tree


def test_tree_match_per_tenant_and_split() -> None:
    t = PrefixTree()
    t.insert([1, 2, 3, 4], "a")
    t.insert([1, 2, 9], "b")  # splits [1,2,3,4] after [1,2]
    m = t.match([1, 2, 3, 7])
    assert m.length == 3
    assert m.per_tenant == {"a": 3, "b": 2}
    assert m.deepest == ("a",)
    assert t.match([1, 2]).deepest == ("b", "a")  # both hold [1,2]; b used last
    assert t.size("a") == 4 and t.size("b") == 3
    t.check()


def test_tree_eviction_is_lru_per_tenant_and_keeps_shared_nodes() -> None:
    t = PrefixTree()
    t.insert([1, 2, 3], "a")
    t.insert([5, 6], "a")
    t.insert([1, 2, 3], "b")
    t.touch([1, 2, 3], "a")  # [5, 6] is now a's least recently used leaf
    assert t.evict("a", 3) == 2
    assert t.match([5, 6]).length == 0
    assert t.match([1, 2, 3]).per_tenant == {"a": 3, "b": 3}
    t.evict("a", 0)
    assert t.match([1, 2, 3]).per_tenant == {"b": 3}  # b's copy stays
    t.check()


def test_tree_remove_tenant() -> None:
    t = PrefixTree()
    t.insert([1, 2, 3], "a")
    t.insert([1, 2, 4], "b")
    t.remove_tenant("a")
    assert t.match([1, 2, 3]).per_tenant == {"b": 2}
    assert t.size("a") == 0
    t.check()


def test_text_key_is_exact_and_keeps_prefixes() -> None:
    assert len(text_key("abcdefg")) == 3
    assert np.array_equal(text_key("abcdef")[:2], text_key("abcdefxyz")[:2])
    assert not np.array_equal(text_key("abcdef"), text_key("abcdeg"))
    assert text_key("").size == 0
    assert len(set(text_key("ééé").tolist() + text_key("eee").tolist())) == 2


# ---------------------------------------------------------------------------- base


def test_round_robin_skips_dead_replicas_and_counts_load() -> None:
    r = RoundRobin()
    r.set_replicas(["a", "b", "c"])
    assert [r.route(rq(str(i), [1])) for i in range(4)] == ["a", "b", "c", "a"]
    r.mark_down("b")
    assert [r.route(rq(f"x{i}", [1])) for i in range(3)] == ["c", "a", "c"]
    assert r.load == {"a": 3, "b": 1, "c": 3}
    r.finish("1")
    assert r.load["b"] == 0
    with pytest.raises(ValueError, match="already in flight"):
        r.route(rq("0", [1]))
    for name in "ac":
        r.mark_down(name)
    with pytest.raises(NoReplicaError):
        r.route(rq("y", [1]))


def test_least_load_picks_fewest_in_flight() -> None:
    r = LeastLoad()
    r.set_replicas(["a", "b"])
    assert r.route(rq("1", [1])) == "a"
    assert r.route(rq("2", [1])) == "b"
    r.finish("1")
    assert r.route(rq("3", [1])) == "a"


# ---------------------------------------------------------------------------- cache_aware


def test_cache_aware_follows_match_then_smallest_tree_then_balance() -> None:
    r = CacheAware(balance_abs_threshold=2, balance_rel_threshold=1.5)
    r.set_replicas(["a", "b"])
    assert r.route(rq("1", [1, 2, 3, 4])) == "a"  # cold: smallest tree (tie: first)
    assert r.route(rq("2", [9, 9, 9, 9])) == "b"  # cold: b's tree is smaller
    assert r.route(rq("3", [1, 2, 3, 5])) == "a"  # 3/4 > 0.5 matched on a
    assert r.decisions == {"balance": 0, "cache_hit": 1, "cache_miss": 2}
    assert r.route(rq("4", [1, 2, 3, 6])) == "a"  # loads 2 vs 1: balanced
    # loads a=3, b=1: 3 - 1 > 2 is false -> still cache; one more makes it 4 vs 1
    assert r.route(rq("5", [1, 2, 3, 7])) == "a"
    assert r.imbalanced(["a", "b"])
    assert r.route(rq("6", [1, 2, 3, 8])) == "b"  # imbalanced: least loaded
    assert r.decisions["balance"] == 1
    assert r.tree.match([1, 2, 3, 8]).per_tenant["b"] == 4  # inserted even when balancing


def test_cache_aware_evicts_on_its_interval() -> None:
    r = CacheAware(eviction_interval=10, max_tree_size=2)
    r.set_replicas(["a"])
    r.route(rq("1", [1, 2, 3, 4]), now=0.0)
    r.route(rq("2", [5, 6, 7, 8]), now=5.0)
    assert r.tree.size("a") == 8
    r.route(rq("3", [9, 9]), now=10.0)  # trims to 2 before routing, then inserts 2
    assert r.tree.size("a") <= 4


def test_router_options_are_checked() -> None:
    with pytest.raises(ValueError, match="cache_threshold"):
        CacheAware(cache_threshold=2)
    with pytest.raises(ValueError, match="quantum"):
        D2LPM(quantum=0)
    with pytest.raises(ValueError, match="must be a number"):
        D2LPM(quantum="lots")


# ---------------------------------------------------------------------------- d2lpm


def test_d2lpm_stays_local_until_the_deficit_is_spent_then_spills_by_load() -> None:
    r = D2LPM(quantum=10, output_price=0)
    r.set_replicas(["a", "b", "c"])
    assert r.route(rq("1", [1, 2, 3, 4], "x")) == "a"  # cold, least loaded; costs 4
    assert r.deficits["x"]["a"] == 6
    assert r.route(rq("2", [1, 2, 3, 5], "x")) == "a"  # local, costs 1 (3 held)
    assert r.route(rq("3", [1, 2, 3, 6], "x")) == "a"
    assert r.route(rq("4", [1, 2, 3, 7], "x")) == "a"
    assert r.route(rq("5", [1, 2, 3, 8], "x")) == "a"
    assert r.route(rq("6", [1, 2, 3, 9], "x")) == "a"
    assert r.deficits["x"]["a"] == 1  # 6 - 5 x 1: still positive
    assert r.route(rq("7", [1, 2, 3, 10], "x")) == "a"
    assert r.deficits["x"]["a"] == 0
    assert r.route(rq("8", [1, 2, 3, 11], "x")) == "b"  # spent: spill to the least loaded
    assert r.decisions == {"local": 6, "spill": 1, "cold": 1, "refill": 0}
    # b now holds the prefix too and is less loaded: the best match for a fresh client
    assert r.route(rq("9", [1, 2, 3, 12], "y")) == "b"
    assert r.last_decision == "local"


def test_d2lpm_refills_when_every_replica_is_spent() -> None:
    r = D2LPM(quantum=4, output_price=0)
    r.set_replicas(["a", "b"])
    r.route(rq("1", [1, 2, 3, 4, 5], "x"))  # a: 4 - 5 = -1
    r.route(rq("2", [6, 7, 8, 9, 10], "x"))  # b: 4 - 5 = -1
    assert r.route(rq("3", [11], "x")) in ("a", "b")
    assert r.decisions["refill"] == 1
    assert sorted(r.deficits["x"].values()) == [-1 + 4 - 1, -1 + 4] or sorted(
        r.deficits["x"].values()
    ) == [2, 3]


def test_d2lpm_refunds_a_request_that_never_reached_its_replica() -> None:
    r = D2LPM(quantum=100)
    r.set_replicas(["a", "b"])
    r.route(rq("1", [1, 2, 3], "x", out=5))  # charge 3 + 2*5 = 13
    assert r.deficits["x"]["a"] == 87
    r.finish("1", outcome=Outcome(ok=False))
    assert r.deficits["x"]["a"] == 100
    assert r.charged["x"]["a"] == 0
    r.mark_down("a")
    assert r.tree.size("a") == 0
    assert r.route(rq("2", [1, 2, 3], "x")) == "b"


# ---------------------------------------------------------------------------- plugins


def test_builtin_routers_register_through_the_hook() -> None:
    pm = PluginManager(load_entrypoints=False)
    assert pm.routers.names() == ["cache_aware", "d2lpm", "least_load", "round_robin"]
    (entry,) = [e for e in pm.routers.entries() if e.name == "d2lpm"]
    assert entry.plugin == "slmserve.routing.d2lpm"
    with pytest.raises(PluginError, match="valid names"):
        pm.routers.get("nope")


def test_a_third_party_router_registers_and_duplicates_are_refused() -> None:
    from slmserve.hookspecs import hookimpl

    class Mine:
        @hookimpl
        def slmserve_register_routers(self, registry) -> None:  # type: ignore[no-untyped-def]
            registry.add("first", LeastLoad, description="always the least loaded")

    pm = PluginManager(load_entrypoints=False, extra_plugins=(Mine(),))
    assert "first" in pm.routers

    class Clash:
        @hookimpl
        def slmserve_register_routers(self, registry) -> None:  # type: ignore[no-untyped-def]
            registry.add("d2lpm", LeastLoad)

    with pytest.raises(PluginError, match="registered twice"):
        PluginManager(load_entrypoints=False, extra_plugins=(Clash(),))


# ---------------------------------------------------------------------------- cluster


UNIT = CostModel(
    step_overhead=1.0,
    prefill_token=0.0,
    prefill_attention=0.0,
    decode_step=0.0,
    decode_seq=0.0,
    decode_context=0.0,
)


def sreq(rid: str, t: float, prompt: list[int], out: int = 1, client: str = "c") -> SimRequest:
    return SimRequest(rid, t, np.asarray(prompt, np.int64), out, client)


def test_one_replica_cluster_reproduces_simulate() -> None:
    w = make_workload("zipf-clients", seed=3, num_requests=150, rate=200.0)
    config = SimConfig(kv_tokens=w.kv_tokens)
    single = simulate(w.requests, DLPM(), config)
    cluster = simulate_cluster(w.requests, D2LPM(), [ReplicaSpec("r0", DLPM(), config)])

    def times(records):  # type: ignore[no-untyped-def]
        return [(r.rid, r.first_scheduled, r.first_token, r.finish) for r in records]

    assert times(cluster.records) == times(single.records)
    assert cluster.replicas["r0"].prefix_hits == single.prefix_hits


def test_cluster_by_hand_two_replicas_round_robin() -> None:
    reqs = [sreq("a", 0.0, [1, 2]), sreq("b", 0.0, [3, 4]), sreq("c", 0.5, [5, 6])]
    specs = [ReplicaSpec(f"r{i}", FCFS(), SimConfig(kv_tokens=16), UNIT) for i in range(2)]
    res = simulate_cluster(reqs, RoundRobin(), specs)
    assert res.replica_of == {"a": "r0", "b": "r1", "c": "r0"}
    by = {r.rid: r for r in res.records}
    # a and b run in parallel on their replicas: one step each (prefill + sample), t 0 -> 1
    assert (by["a"].finish, by["b"].finish) == (1.0, 1.0)
    # c arrives at 0.5 while r0's step is in flight; it starts at 1.0 and ends at 2.0
    assert (by["c"].first_scheduled, by["c"].finish) == (1.0, 2.0)
    s = summarize_cluster(res)
    assert s.finished == 3 and s.request_imbalance == pytest.approx(2 / 1.5)
    assert s.clients["c"].latency.max == pytest.approx(1.5)


def test_cluster_router_hears_every_finish() -> None:
    w = make_workload("zipf-clients", seed=1, num_requests=120, rate=400.0)
    config = SimConfig(kv_tokens=w.kv_tokens)
    router = CacheAware()
    res = simulate_cluster(
        w.requests, router, [ReplicaSpec(f"r{i}", DLPM(), config) for i in range(3)]
    )
    assert router.in_flight == 0 and all(v == 0 for v in router.load.values())
    assert sum(router.routed.values()) == 120
    assert all(r.finish is not None for r in res.records)
    s = summarize_cluster(res)
    assert 0 < s.cache_hit_rate < 1 and s.load_imbalance >= 1


def test_zipf_clients_workload_is_skewed_and_deterministic() -> None:
    w = make_workload("zipf-clients", seed=0, num_requests=2000, clients=4, client_skew=1.0)
    counts = {c: sum(r.client == c for r in w.requests) for c in ("client0", "client3")}
    assert counts["client0"] > 3 * counts["client3"]
    again = make_workload("zipf-clients", seed=0, num_requests=2000, clients=4, client_skew=1.0)
    assert [r.prompt.tolist() for r in w.requests[:20]] == [
        r.prompt.tolist() for r in again.requests[:20]
    ]
    groups = {r.group for r in w.requests if r.client == "client0"}
    assert len(groups) == 4
    with pytest.raises(ValueError, match="Zipf"):
        make_workload("zipf-clients", client_skew=-1)


def test_simulate_command_runs_a_cluster(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from slmserve.cli import main

    out = tmp_path / "cl"
    rc = main(
        ["simulate", "--workload", "zipf-clients", "--workload-opt", "num_requests=80",
         "--replicas", "2", "--router", "d2lpm:quantum=4096,round_robin", "--load", "0.5",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "d2lpm:quantum=4096" in table and "round_robin" in table
    data = json.loads((out / "results.json").read_text())
    assert data["replicas"] == 2
    (d2, rr) = data["runs"]
    assert d2["local_scheduler"] == "dlpm" and rr["local_scheduler"] == "lpm"
    assert d2["summary"]["finished"] == 80 and set(d2["replica_of"].values()) == {"r0", "r1"}
    assert main(["simulate", "--replicas", "2", "--router", "nope"]) == 2
    assert "unknown router 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the benchmark


def _routing_benchmark():  # type: ignore[no-untyped-def]
    """``benchmarks/routing.py`` as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "routing.py"
    spec = importlib.util.spec_from_file_location("routing_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flood_workload_keeps_light_clients_within_their_share() -> None:
    """The light clients stay under a fair share; the heavy one floods only its window."""
    bench = _routing_benchmark()
    config = SimConfig(kv_tokens=32_768)
    requests, info = bench.flood_workload(2, config, 120, 1.5, 0.5)
    light = [r for r in requests if r.client != "client0"]
    heavy = [r for r in requests if r.client == "client0"]
    assert len(light) == 120 and len(heavy) == info["heavy_requests"] > len(light)
    assert {r.client for r in light} <= {f"client{c}" for c in range(1, 8)}
    assert info["busiest_light_share"] < 1 / 8
    span = info["span_s"]
    assert span / 4 <= min(r.arrival for r in heavy)
    assert max(r.arrival for r in heavy) <= 3 * span / 4 + 1e-9
    assert [r.arrival for r in requests] == sorted(r.arrival for r in requests)
    assert len({r.rid for r in requests}) == len(requests)
    heavy_rate = (len(heavy) - 1) / (heavy[-1].arrival - heavy[0].arrival)
    assert heavy_rate == pytest.approx(info["heavy_rate_rps"])


@pytest.mark.slow
def test_routing_benchmark_quick_simulator_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "routing.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--parts", "a", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "routing_a.md").read_text()
    assert "cache_aware / d2lpm worst light-client P99" in table
    assert table.count("| burst 1.5x | 4 |") == 8
