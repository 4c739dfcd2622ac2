"""Hand-worked examples for the simulator, its workloads, metrics and ``slmserve simulate``.

Random, property-based runs of every scheduler live in ``tests/property/test_sim_properties.py``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from slmserve.config import ConfigError
from slmserve.engine.core import ScheduledSeq, StepPlan
from slmserve.engine.sequence import Sequence as Seq
from slmserve.plugins import PluginManager
from slmserve.schedulers.dlpm import DLPM
from slmserve.schedulers.fcfs import FCFS
from slmserve.schedulers.lpm import LPM
from slmserve.sim import (
    CostModel,
    SimConfig,
    SimRequest,
    TraceEntry,
    make_workload,
    measure_capacity,
    read_trace,
    report,
    simulate,
    summarize,
    trace_workload,
    write_trace,
)
from slmserve.sim.cli import add_simulate_parser, parse_loads, parse_scheduler_specs
from slmserve.types import SamplingParams, SchedRequest, StepReport

UNIT = CostModel(
    step_overhead=1.0,
    prefill_token=0.0,
    prefill_attention=0.0,
    decode_step=0.0,
    decode_seq=0.0,
    decode_context=0.0,
)
"""Every step takes exactly one second: times count steps."""


def req(
    rid: str,
    arrival: float,
    prompt: Sequence[int],
    output_len: int = 1,
    client: str = "default",
) -> SimRequest:
    return SimRequest(rid, arrival, np.asarray(prompt, np.int64), output_len, client)


# ---------------------------------------------------------------------------- cost model


def _item(num_prompt: int, start: int, n: int) -> ScheduledSeq:
    seq = Seq("r", list(range(1, num_prompt + 1)), SamplingParams(), arrival_time=0.0,
              client_id="c", eos_ids=frozenset())  # fmt: skip
    empty = np.empty(0, np.int64)
    return ScheduledSeq(seq, start, n, empty, empty, True)


def test_step_time_charges_prefill_attention_and_decode() -> None:
    cost = CostModel(
        step_overhead=1.0,
        prefill_token=2.0,
        prefill_attention=3.0,
        decode_step=5.0,
        decode_seq=7.0,
        decode_context=11.0,
    )
    prefill = _item(num_prompt=100, start=10, n=4)  # a chunk: tokens 10..13
    decode = _item(num_prompt=8, start=9, n=1)  # past the prompt: one decode token
    last_prompt_token = _item(num_prompt=8, start=7, n=1)  # a 1-token chunk of prompt: prefill
    assert cost.step_time(StepPlan(0.0, [prefill])) == 1 + 2 * 4 + 3 * 4 * (10 + 2.5)
    assert cost.step_time(StepPlan(0.0, [decode])) == 1 + 5 + 7 * 1 + 11 * 10
    assert cost.step_time(StepPlan(0.0, [last_prompt_token])) == 1 + 2 * 1 + 3 * (7 + 1)
    both = cost.step_time(StepPlan(0.0, [prefill, decode, decode]))
    assert both == 1 + 2 * 4 + 3 * 4 * 12.5 + 5 + 7 * 2 + 11 * 20


def test_cost_model_round_trips_through_toml_and_json(tmp_path: Path) -> None:
    cost = CostModel(prefill_token=2e-5, decode_seq=1e-4)
    (tmp_path / "c.toml").write_text(cost.to_toml())
    assert CostModel.load(tmp_path / "c.toml") == cost
    (tmp_path / "c.json").write_text(json.dumps({"step_overhead": 0.5}))
    assert CostModel.load(tmp_path / "c.json") == CostModel(step_overhead=0.5)
    (tmp_path / "bad.toml").write_text("prefil_token = 1.0\n")
    with pytest.raises(ValueError, match="prefil_token"):
        CostModel.load(tmp_path / "bad.toml")
    (tmp_path / "neg.json").write_text(json.dumps({"decode_step": -1}))
    with pytest.raises(ValueError, match="decode_step"):
        CostModel.load(tmp_path / "neg.json")


# ---------------------------------------------------------------------------- the loop


def test_one_request_times_by_hand() -> None:
    r = simulate([req("a", 0.5, range(1, 11), output_len=3)], FCFS(), cost=UNIT)
    (rec,) = r.records
    # The engine idles until 0.5; step 1 prefills and samples token 1; two decode steps follow.
    assert (rec.arrival, rec.first_scheduled, rec.first_token, rec.finish) == (0.5, 0.5, 1.5, 3.5)
    assert (rec.output_tokens, rec.admissions, rec.preemptions, rec.cached_tokens) == (3, 1, 0, 0)
    assert r.steps.start.tolist() == [0.5, 1.5, 2.5]
    assert r.steps.prefill_tokens.tolist() == [10, 0, 0]
    assert r.steps.decode_seqs.tolist() == [0, 1, 1]
    assert r.steps.prompt.ravel().tolist() == [10, 0, 0]
    assert r.steps.output.ravel().tolist() == [1, 1, 1]
    assert r.end_time == 3.5


def test_idle_engine_jumps_to_the_next_arrival() -> None:
    r = simulate([req("a", 0.0, [1, 2]), req("b", 10.0, [3, 4])], FCFS(), cost=UNIT)
    a, b = r.records
    assert (a.first_scheduled, a.finish) == (0.0, 1.0)
    assert (b.first_scheduled, b.finish) == (10.0, 11.0)
    assert len(r.steps) == 2


def test_a_later_request_hits_the_cached_prefix() -> None:
    shared = list(range(100, 140))
    reqs = [req("a", 0.0, [*shared, 1, 2]), req("b", 5.0, [*shared, 3, 4, 5])]
    r = simulate(reqs, FCFS(), cost=UNIT)
    assert [x.cached_tokens for x in r.records] == [0, 40]
    assert r.prefix_hits == 40 and r.prefix_queries == 42 + 43
    assert r.prompt_tokens_computed == 42 + 3
    assert summarize(r).cache_hit_rate == pytest.approx(40 / 85)


def test_prefix_is_hit_while_its_creator_still_decodes() -> None:
    """Insertion after prefill, not after finish: the engine's ``cache_unfinished_req``."""
    shared = list(range(100, 140))
    reqs = [req("a", 0.0, [*shared, 1], output_len=10), req("b", 3.0, [*shared, 2])]
    r = simulate(reqs, FCFS(), cost=UNIT)
    a, b = r.records
    assert b.first_scheduled < a.finish
    assert b.cached_tokens == 40


class Recorder(FCFS):
    """FCFS that logs the order of scheduler callbacks."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_arrival(self, request: SchedRequest, now: float) -> None:
        self.events.append(f"arrive {request.rid}@{now:g}")

    def on_step(self, report: StepReport) -> None:
        self.events.append(f"step admitted={report.admitted} finished={report.finished}")


def test_requests_arriving_during_a_step_join_before_it_completes() -> None:
    sched = Recorder()
    simulate([req("a", 0.0, [1, 2, 3]), req("b", 0.5, [4, 5, 6])], sched, cost=UNIT)
    assert sched.events == [
        "arrive a@0",
        "arrive b@0.5",  # while a's step (0 -> 1) runs, as in the async engine
        "step admitted=['a'] finished=['a']",
        "step admitted=['b'] finished=['b']",
    ]


def test_admission_that_evicts_a_later_requests_match() -> None:
    """Admitting ``x`` evicts the cached prefix ``y`` matched earlier in the same round.

    The engine must match ``y`` again (here: nothing is left, and ``y`` waits for room) rather
    than lock the evicted node.
    """
    prefix = list(range(100, 108))
    reqs = [
        req("p", 0.0, prefix),  # leaves the 8-token prefix cached and unlocked
        req("x", 10.0, range(200, 212)),  # 12 tokens: needs 4 of the prefix's slots
        req("y", 10.0, [*prefix, 1, 2]),  # matched 8 tokens at the round's start
    ]
    config = SimConfig(kv_tokens=16, max_batch_tokens=64, chunked_prefill_size=64)
    r = simulate(reqs, FCFS(), config, UNIT, check=True)
    _, x, y = r.records
    assert x.first_scheduled == 10.0 and y.first_scheduled == 11.0
    assert y.cached_tokens == 0
    assert all(rec.finish is not None for rec in r.records)


def test_partially_matched_edge_does_not_block_an_idle_engine() -> None:
    """``b`` matches 3 tokens inside the cached edge ``[1, 2, 3, 9, 1]``. Admission splits the
    edge at the match before locking, so the unused tail ``[9, 1]`` stays evictable and ``b``'s
    chunk (3 slots) fits: 2 free + 2 evicted. Locking the whole edge would leave only the 2 free
    slots and the idle engine would fail ``b`` as "does not fit in the KV cache"."""
    reqs = [req("a", 0.0, [1, 2, 3, 9, 1]), req("b", 1.0, [1, 2, 3, 4, 5, 6])]
    config = SimConfig(kv_tokens=7, max_batch_tokens=5, chunked_prefill_size=5)
    r = simulate(reqs, FCFS(), config, UNIT, check=True)
    assert r.records[1].finish is not None


def test_until_cuts_an_overloaded_run_off() -> None:
    reqs = [req(f"r{i}", 0.0, [i + 1] * 4) for i in range(10)]
    config = SimConfig(max_running_requests=1)
    r = simulate(reqs, FCFS(), config, UNIT, until=3.0)
    assert r.end_time == 3.0
    assert sum(rec.finish is not None for rec in r.records) == 3
    assert summarize(r).finished == 3


def test_closed_loop_keeps_each_client_backlogged() -> None:
    reqs = [req(f"{c}{i}", 100.0 + i, [ord(c), i + 1], client=c) for c in "ab" for i in range(6)]
    config = SimConfig(max_running_requests=1)
    r = simulate(reqs, FCFS(), config, UNIT, backlog=2, per_client=True)
    assert r.end_time == 12.0  # arrival times ignored: back to back from t=0
    assert r.steps.waiting.max() <= 4
    assert r.steps.backlogged[:9].all()  # both clients wait until their sources run dry
    assert [rec.arrival for rec in r.records if rec.client == "a"][:3] == [0.0, 0.0, 1.0]


def test_closed_loop_with_one_shared_backlog() -> None:
    reqs = [req(f"r{i}", float(i), [i + 1]) for i in range(8)]
    r = simulate(reqs, FCFS(), SimConfig(max_running_requests=1), UNIT, backlog=3)
    assert r.steps.waiting.max() == 3
    assert r.end_time == 8.0


def test_validation_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="more than kv_tokens"):
        simulate([req("a", 0.0, range(1, 20), output_len=5)], FCFS(), SimConfig(kv_tokens=16))
    with pytest.raises(ValueError, match="duplicate"):
        simulate([req("a", 0.0, [1]), req("a", 1.0, [2])], FCFS())
    with pytest.raises(ValueError, match="output_len"):
        simulate([req("a", 0.0, [1], output_len=0)], FCFS())
    with pytest.raises(ValueError, match="arrival"):
        simulate([req("a", -1.0, [1])], FCFS())


def test_simulate_reports_per_client_service_and_backlog() -> None:
    reqs = [req("a", 0.0, [1] * 5, client="x"), req("b", 0.0, [2] * 7, client="y")]
    r = simulate(reqs, FCFS(), SimConfig(max_running_requests=1), UNIT)
    assert r.steps.clients == ["x", "y"]
    assert r.steps.prompt.sum(axis=0).tolist() == [5, 7]
    assert r.steps.backlogged.tolist() == [[True, True], [False, True]]


def test_measure_capacity_is_fcfs_saturated_throughput() -> None:
    reqs = [req(f"r{i}", float(i), [i + 1] * 3) for i in range(10)]
    config = SimConfig(max_running_requests=2)
    assert measure_capacity(reqs, config, UNIT) == pytest.approx(10 / 5)


# ---------------------------------------------------------------------------- workloads


def test_klpm_workload_is_the_papers_model() -> None:
    w = make_workload("klpm", seed=3, num_requests=64, groups=4, prefix_len=50, rate=10.0)
    assert len(w.requests) == 64
    assert [r.arrival for r in w.requests] == pytest.approx([j / 10 for j in range(64)])
    by_group: dict[str | None, list[SimRequest]] = {}
    for r in w.requests:
        by_group.setdefault(r.group, []).append(r)
    assert sorted(len(v) for v in by_group.values()) == [16, 16, 16, 16]
    for members in by_group.values():
        heads = {tuple(r.prompt[:50].tolist()) for r in members}
        assert len(heads) == 1
        assert all(200 <= len(r.prompt) - 50 <= 500 for r in members)
        assert all(1 <= r.output_len <= 10 for r in members)
    assert len({tuple(v[0].prompt[:50].tolist()) for v in by_group.values()}) == 4
    groups = [r.group for r in w.requests]
    assert groups != sorted(groups)  # shuffled
    again = make_workload("klpm", seed=3, num_requests=64, groups=4, prefix_len=50, rate=10.0)
    assert all(np.array_equal(a.prompt, b.prompt) for a, b in zip(w.requests, again.requests))
    other = make_workload("klpm", seed=4, num_requests=64, groups=4, prefix_len=50)
    assert not np.array_equal(w.requests[0].prompt, other.requests[0].prompt)


def test_scaling_arrivals_sets_the_offered_rate() -> None:
    w = make_workload("klpm", num_requests=11, rate=10.0, prefix_len=5, suffix_len=1)
    assert w.offered_rate == pytest.approx(10.0)
    fast = w.scaled(40.0)
    assert fast.offered_rate == pytest.approx(40.0)
    assert [r.rid for r in fast.requests] == [r.rid for r in w.requests]
    assert {r.arrival for r in w.at_once().requests} == {0.0}
    with pytest.raises(ValueError, match="all at once"):
        w.at_once().scaled(1.0)


def test_gsp_workload_shape() -> None:
    w = make_workload("gsp", num_groups=3, prompts_per_group=4, system_prompt_len=20,
                      question_len=5, output_len=7)  # fmt: skip
    assert len(w.requests) == 12
    assert all(len(r.prompt) == 25 and r.output_len == 7 for r in w.requests)
    assert len({tuple(r.prompt[:20].tolist()) for r in w.requests}) == 3
    arrivals = [r.arrival for r in w.requests]
    assert arrivals == sorted(arrivals)


def test_vtc_suites_follow_the_artifact() -> None:
    w = make_workload("vtc-overload", duration=60.0)
    counts = {c: sum(r.client == c for r in w.requests) for c in ("client0", "client1")}
    assert counts == {"client0": 90, "client1": 180}
    assert {len(r.prompt) for r in w.requests} == {256} and {r.output_len for r in w.requests} == {
        256
    }
    on_off = make_workload("vtc-on-off-overload", duration=240.0)
    c0 = [r.arrival for r in on_off.requests if r.client == "client0"]
    assert c0 and all(int(t // 60) % 2 == 0 for t in c0)
    prop = make_workload("vtc-proportional", duration=40.0)
    assert sorted({r.client for r in prop.requests}) == ["client0", "client1", "client2"]
    short_long = make_workload("vtc-poisson-short-long-2", duration=10.0)
    for r in short_long.requests:
        expected = (512, 32) if r.client == "client0" else (32, 512)
        assert (len(r.prompt), r.output_len) == expected


def test_locality_mix_has_one_local_and_one_unique_client() -> None:
    w = make_workload("locality-mix", num_requests=200, docs=3, doc_len=100)
    docs = [r for r in w.requests if r.client == "docs"]
    unique = [r for r in w.requests if r.client == "unique"]
    assert docs and unique
    assert len({tuple(r.prompt[:100].tolist()) for r in docs}) == 3
    assert len({tuple(r.prompt[:8].tolist()) for r in unique}) == len(unique)


def test_unknown_workload_or_option_is_named() -> None:
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        make_workload("nope")
    with pytest.raises(ValueError, match="bogus"):
        make_workload("klpm", bogus=1)


def test_trace_round_trip(tmp_path: Path) -> None:
    w = make_workload("locality-mix", num_requests=20, docs=2, doc_len=30)
    write_trace(w, tmp_path / "t.jsonl")
    back = read_trace(tmp_path / "t.jsonl")
    assert [(r.rid, r.arrival, r.client, r.output_len) for r in back.requests] == [
        (r.rid, r.arrival, r.client, r.output_len) for r in w.requests
    ]
    assert all(np.array_equal(a.prompt, b.prompt) for a, b in zip(back.requests, w.requests))


def test_trace_lengths_and_prefix_groups(tmp_path: Path) -> None:
    lines = [
        {
            "arrival": 0.0,
            "output_len": 2,
            "prompt_len": 30,
            "prefix_group": "sys",
            "prefix_len": 20,
        },
        {
            "arrival": 1.0,
            "output_len": 2,
            "prompt_len": 12,
            "prefix_group": "sys",
            "prefix_len": 10,
        },
        {"arrival": 2.0, "output_len": 1, "prompt_len": 5, "client": "b"},
        {"arrival": 3.0, "output_len": 1, "prompt_tokens": [7, 8, 9]},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    w = read_trace(path, seed=1)
    a, b, c, d = w.requests
    assert (len(a.prompt), len(b.prompt), len(c.prompt)) == (30, 12, 5)
    assert np.array_equal(a.prompt[:10], b.prompt[:10])  # shorter prefix of the same group
    assert not np.array_equal(a.prompt[20:22], b.prompt[10:12])
    assert d.prompt.tolist() == [7, 8, 9] and c.client == "b"
    same = trace_workload([TraceEntry(**lines[0])], seed=1)  # type: ignore[arg-type]
    assert np.array_equal(same.requests[0].prompt[:20], a.prompt[:20])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"arrival": 0.0, "output_len": 1}, "exactly one of"),
        ({"arrival": 0.0, "output_len": 0, "prompt_len": 3}, "output_len"),
        ({"arrival": 0.0, "output_len": 1, "prompt_len": 3, "prefix_len": 2}, "prefix_group"),
        ({"arrival": 0.0, "output_len": 1, "prompt_len": 3, "bogus": 1}, "bogus"),
        ({"arrival": -1.0, "output_len": 1, "prompt_len": 3}, "arrival"),
    ],
)
def test_bad_trace_lines_are_named(tmp_path: Path, line: dict, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"arrival": 0.0, "output_len": 1, "prompt_len": 2}) + "\n")
    path.write_text(path.read_text() + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl:2: .*{message}"):
        read_trace(path)


# ---------------------------------------------------------------------------- metrics


def test_max_service_gap_by_hand() -> None:
    # Two clients, four steps. Both backlogged in steps 0-2, then f stops waiting.
    service = np.array([[10, 0], [10, 0], [0, 30], [50, 0]], np.float64)
    backlogged = np.array([[1, 1], [1, 1], [1, 1], [0, 1]], bool)
    # D = f - g over the stretch: 0, 10, 20, -10: worst sub-interval difference 30.
    assert report.max_service_gap(service, backlogged) == 30.0
    assert report.max_service_gap(service, np.zeros_like(backlogged)) == 0.0


def test_service_gap_restarts_after_a_break_in_backlog() -> None:
    service = np.array([[10, 0], [10, 0], [100, 0], [0, 5]], np.float64)
    backlogged = np.array([[1, 1], [1, 1], [0, 1], [1, 1]], bool)
    assert report.max_service_gap(service, backlogged) == 20.0


def test_jain_index() -> None:
    service = np.array([[4.0, 4.0], [2.0, 2.0]])
    everyone = np.ones((2, 2), bool)
    assert report.jain_index(service, everyone) == pytest.approx(1.0)
    skewed = np.array([[9.0, 1.0]])
    assert report.jain_index(skewed, np.ones((1, 2), bool)) == pytest.approx(100 / (2 * 82))
    assert report.jain_index(service, np.array([[1, 0], [0, 1]], bool)) is None
    assert report.jain_index(service[:, :1], everyone[:, :1]) == 1.0


def test_summary_of_a_small_run(tmp_path: Path) -> None:
    w = make_workload("locality-mix", num_requests=40, docs=2, doc_len=64, unique_len=(16, 32))
    r = simulate(w.requests, DLPM(quantum=256), SimConfig(kv_tokens=2048))
    s = summarize(r)
    assert s.requests == s.finished == 40
    assert 0 < s.cache_hit_rate < 1
    assert s.ttft.p50 is not None and s.ttft.p50 <= s.ttft.p90 <= s.ttft.p99 <= s.ttft.max
    assert s.throughput_rps == pytest.approx(40 / (r.end_time - r.records[0].arrival))
    assert sum(c.requests for c in s.clients.values()) == 40
    assert 0 < s.busy_fraction <= 1
    series = report.service_over_time(r, points=10)
    assert len(series["t"]) <= 10 and set(series["service"]) == {"docs", "unique"}
    report.write_json(tmp_path / "s.json", {"summary": s, "records": r.records[:2]})
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["summary"]["finished"] == 40 and data["records"][0]["rid"] == r.records[0].rid


def test_plots_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [("fcfs", 0.5, 0.1), ("fcfs", 1.0, 0.4), ("lpm", 0.5, 0.1), ("lpm", 1.0, None)]
    report.plot_metric_vs_load(rows, tmp_path / "a.png", title="t")
    data = {"t": [0.0, 1.0], "service": {"a": [0.0, 5.0], "b": [0.0, 3.0]}}
    report.plot_service([("x", data), ("y", data)], tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- CLI


def test_scheduler_specs() -> None:
    specs = parse_scheduler_specs("fcfs, klpm:k=4 ,dlpm:q=2048,lpm:mode=ideal:fallback_queue_len=0")
    assert [(s.label, s.name, s.options) for s in specs] == [
        ("fcfs", "fcfs", {}),
        ("klpm:k=4", "klpm", {"k": 4}),
        ("dlpm:q=2048", "dlpm", {"quantum": 2048}),
        ("lpm:mode=ideal:fallback_queue_len=0", "lpm", {"mode": "ideal", "fallback_queue_len": 0}),
    ]
    with pytest.raises(ConfigError, match="twice"):
        parse_scheduler_specs("fcfs,fcfs")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_scheduler_specs("klpm:4")
    assert parse_loads("0.5, 1.2") == [0.5, 1.2]
    with pytest.raises(ConfigError):
        parse_loads("0.5,-1")


def _simulate_cli(argv: list[str]) -> int:
    """``slmserve simulate ARGV`` the way the main CLI wires it."""
    plugins = PluginManager(load_entrypoints=False)
    parser = argparse.ArgumentParser(prog="slmserve")
    sub = parser.add_subparsers(dest="command")
    handler = add_simulate_parser(sub, plugins)
    return handler(parser.parse_args(["simulate", *argv]), plugins)


def test_simulate_command_writes_results_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    argv = [
        "--workload", "klpm",
        "--workload-opt", "num_requests=40",
        "--workload-opt", "prefix_len=60",
        "--workload-opt", "suffix_len=[10, 20]",
        "--workload-opt", "groups=4",
        "--kv-tokens", "1024",
        "--schedulers", "fcfs,klpm:k=2,dlpm:q=inf",
        "--load", "0.5,1.2",
        "--seed", "1",
        "--out", str(out),
    ]  # fmt: skip
    assert _simulate_cli(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["capacity_rps"] > 0 and "FCFS" in data["capacity_definition"]
    assert data["config"]["kv_tokens"] == 1024 and data["workload"]["requests"] == 40
    runs = data["runs"]
    assert [(e["scheduler"], e["load"]) for e in runs] == [
        (s, load) for load in (0.5, 1.2) for s in ("fcfs", "klpm:k=2", "dlpm:q=inf")
    ]
    for e in runs:
        assert e["arrival_rate"] == pytest.approx(e["load"] * data["capacity_rps"])
        assert e["summary"]["finished"] == 40 and len(e["requests"]) == 40
        assert set(e["summary"]["ttft"]) == {"p50", "p90", "p99", "max", "mean"}
    assert (out / "p99_ttft_vs_load.png").exists() and (out / "service_over_time.png").exists()
    assert "klpm:k=2" in capsys.readouterr().out


def test_simulate_command_closed_loop_trace(tmp_path: Path) -> None:
    w = make_workload("locality-mix", num_requests=30, docs=2, doc_len=40, unique_len=(8, 16))
    write_trace(w, tmp_path / "t.jsonl")
    argv = [
        "--trace", str(tmp_path / "t.jsonl"),
        "--closed-loop", "4",
        "--until", "0.5",
        "--schedulers", "vtc,lpm",
        "--kv-tokens", "4096",
        "--no-plots",
        "--no-requests",
        "--out", str(tmp_path / "o"),
    ]  # fmt: skip
    assert _simulate_cli(argv) == 0
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["workload"]["name"] == "trace:t.jsonl" and data["closed_loop"] == 4
    assert all("requests" not in e and e["load"] is None for e in data["runs"])
    assert all(e["summary"]["duration"] <= 0.5 + 0.1 for e in data["runs"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--schedulers", "nope"], "unknown scheduler 'nope'"),
        (["--schedulers", "klpm:k=0"], "'k'"),
        (["--schedulers", "klpm:bogus=1"], "bogus"),
        (["--workload-opt", "bogus=1"], "bogus"),
        (["--load", "1", "--closed-loop", "4"], "exclude"),
        (["--trace", "/nonexistent.jsonl"], "nonexistent"),
        (["--until", "-1"], "--until must be > 0"),
    ],
)
def test_simulate_command_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    from slmserve.interfaces import PluginError

    with pytest.raises((ConfigError, PluginError), match=message):
        _simulate_cli([*argv, "--out", str(tmp_path)])


def test_cost_model_file_option(tmp_path: Path) -> None:
    (tmp_path / "cost.toml").write_text(UNIT.to_toml())
    argv = ["--workload-opt", "num_requests=4", "--workload-opt", "prefix_len=8",
            "--workload-opt", "suffix_len=2", "--schedulers", "fcfs", "--no-plots",
            "--cost-model", str(tmp_path / "cost.toml"), "--out", str(tmp_path / "o")]  # fmt: skip
    assert _simulate_cli(argv) == 0
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["cost_model"]["step_overhead"] == 1.0
    (run,) = data["runs"]
    assert run["summary"]["duration"] > run["summary"]["steps"] - 1  # every step is 1 s


def test_lpm_and_dlpm_with_infinite_quantum_admit_alike() -> None:
    """Through the real engine core: ``dlpm:q=inf`` reproduces ideal LPM's whole schedule."""
    w = make_workload("locality-mix", num_requests=60, docs=3, doc_len=64, unique_len=(16, 48))
    config = SimConfig(kv_tokens=600)
    a = simulate(w.requests, LPM(mode="ideal"), config, trace=True)
    b = simulate(w.requests, DLPM(quantum=math.inf), config, trace=True)
    assert a.trace == b.trace


def test_admission_reserves_the_whole_prompt_not_its_first_chunk() -> None:
    """Two 8-token prompts, chunks of 2, room for 12 slots. Checking only the first chunk would
    admit both (2 + 2 fit), and their later chunks would collide: a preemption and recomputed
    work. Reserving each running request's whole remaining prompt admits the second only once
    the first has finished."""
    reqs = [req("a", 0.0, list(range(1, 9))), req("b", 0.0, list(range(11, 19)))]
    config = SimConfig(kv_tokens=12, max_batch_tokens=4, chunked_prefill_size=2)
    r = simulate(reqs, FCFS(), config, UNIT, check=True)
    assert sum(rec.preemptions for rec in r.records) == 0
    assert r.records[1].first_scheduled >= r.records[0].finish


def test_cost_model_loads_from_a_json_profile_with_a_cost_model_table(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"host": "x", "cost_model": {"prefill_token": 2e-5}}))
    assert CostModel.load(path).prefill_token == 2e-5
    path.write_text(json.dumps({"cost_model": {"prefill_token": -1}}))
    with pytest.raises(ValueError, match="invalid cost model"):
        CostModel.load(path)
