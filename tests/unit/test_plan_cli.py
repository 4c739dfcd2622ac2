"""``slmserve plan`` and ``slmserve bench profile`` end to end, and the simulated fleet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from slmserve.cli import main
from slmserve.plan.fleet import ReplicaType, RoutedSimFleet, SplitSimFleet
from slmserve.plan.profile import read_profile
from slmserve.plan.workload import Shape
from slmserve.schedulers.fcfs import FCFS
from slmserve.sim import CostModel, SimConfig, measure_capacity

SHAPE = Shape(prompt_tokens=32, shared_prefix=0.5, output_tokens=2)
SMALL = CostModel(step_overhead=0.01, prefill_token=1e-3, decode_step=0.005, decode_seq=1e-3)
BIG = CostModel(step_overhead=0.002, prefill_token=2e-4, decode_step=0.001, decode_seq=2e-4)

CATALOG = """
[workload]
prompt_tokens = 32
shared_prefix = 0.5
output_tokens = 2

[[type]]
name = "small"
price_per_hour = 1.0
max_count = 6
[type.profile]
source = "hand-entered, not measured: test numbers"
[type.profile.cost_model]
step_overhead = 0.01
prefill_token = 0.001
decode_step = 0.005
decode_seq = 0.001

[[type]]
name = "big"
price_per_hour = 3.0
max_count = 3
[type.profile]
source = "hand-entered, not measured: test numbers"
[type.profile.cost_model]
step_overhead = 0.002
prefill_token = 0.0002
decode_step = 0.001
decode_seq = 0.0002
"""

FAST = ["--iterations", "150", "--restarts", "2", "--sim-requests", "60", "--no-plot"]


def fleet(requests: int = 60) -> SplitSimFleet:
    types = [ReplicaType("small", SMALL, SimConfig()), ReplicaType("big", BIG, SimConfig())]
    return SplitSimFleet(types, SHAPE, FCFS, requests=requests, verify_requests=2 * requests)


def test_routed_fleet_verifies_on_the_cluster_simulator() -> None:
    """One replica: the router has no choice, so the cluster simulator must give the split
    model's exact answer; more replicas of the same type behind least_load must do better
    at the same demand than one replica (not worse, as a broken router would)."""
    from slmserve.routing.least_load import LeastLoad

    types = [ReplicaType("small", SMALL, SimConfig()), ReplicaType("big", BIG, SimConfig())]
    split = SplitSimFleet(types, SHAPE, FCFS, requests=60, verify_requests=120)
    routed = RoutedSimFleet(types, SHAPE, FCFS, LeastLoad, requests=60, verify_requests=120)
    demand = 0.6 * split.capacity[0]
    one = routed.verify((1, 0), demand)
    assert one == pytest.approx(split.verify((1, 0), demand))
    assert routed.verify((3, 0), demand) < one
    assert routed.verify((0, 0), demand) == float("inf")


def test_split_fleet_capacity_is_the_simulators_saturated_throughput() -> None:
    f = fleet()
    for t, rtype in enumerate(f.types):
        expected = measure_capacity(f.work.items, rtype.config, rtype.cost)
        assert f.capacity[t] == pytest.approx(expected)
    assert f.capacity[1] > 3 * f.capacity[0]  # the big type is much faster
    assert (f.unloaded_p99 > 0).all() and f.unloaded_p99[1] < f.unloaded_p99[0]


def test_split_fleet_latency_grows_with_load_and_caches_simulations() -> None:
    f = fleet()
    mu = f.capacity
    low = f.p99((2, 1), 0.3 * (2 * mu[0] + mu[1]))
    high = f.p99((2, 1), 0.9 * (2 * mu[0] + mu[1]))
    assert 0 < low < high
    sims = f.simulations
    assert f.p99((4, 2), 0.3 * (4 * mu[0] + 2 * mu[1])) == low  # same utilisation: cached
    assert f.simulations == sims
    assert math.isinf(f.p99((1, 0), 2 * mu[0]))  # overloaded
    exact = f.verify((2, 1), 0.3 * (2 * mu[0] + mu[1]))
    assert 0 < exact <= 1.5 * low


def test_split_fleet_p99_mixes_types_by_traffic_share() -> None:
    """A fleet of both types lies between the all-small and all-big fleets at equal load."""
    f = fleet()
    mu = f.capacity
    only_small = f.p99((3, 0), 0.5 * 3 * mu[0])
    only_big = f.p99((0, 1), 0.5 * mu[1])
    mixed = f.p99((3, 1), 0.5 * (3 * mu[0] + mu[1]))
    assert only_big <= mixed <= only_small


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_cli_happy_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cat.toml").write_text(CATALOG)
    out = tmp_path / "out"
    code, stdout, err = run(
        ["plan", "--catalog", str(tmp_path / "cat.toml"), "--demand", "40", "--slo-p99", "2.0",
         "--out", str(out), *FAST],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads((out / "plan.json").read_text())
    (period,) = data["periods"]
    assert period["feasible"] and period["p99"] <= 2.0
    assert period["capacity"] >= 40
    cost = period["counts"]["small"] * 1.0 + period["counts"]["big"] * 3.0
    assert period["cost_per_hour"] == pytest.approx(cost)
    assert period["cost_per_hour"] >= period["lp_bound"]
    assert [t["name"] for t in data["types"]] == ["small", "big"]
    assert "hand-entered" in data["types"][0]["profile_source"]
    assert "cost/h" in stdout and "wrote" in stdout


def test_plan_cli_trace_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "cat.toml").write_text(CATALOG)
    (tmp_path / "d.csv").write_text("period,demand\nh0,10\nh1,40\nh2,20\n")
    out = tmp_path / "out"
    code, _, err = run(
        ["plan", "--catalog", str(tmp_path / "cat.toml"), "--demand-trace",
         str(tmp_path / "d.csv"), "--slo-p99", "2.0", "--change-cost", "0.1",
         "--out", str(out), *FAST[:-1]],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    periods = json.loads((out / "plan.json").read_text())["periods"]
    assert [p["period"] for p in periods] == ["h0", "h1", "h2"]
    assert all(p["capacity"] >= p["demand"] for p in periods)
    assert (out / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_cli_reports_infeasible_demand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cat.toml").write_text(CATALOG)
    code, stdout, _ = run(
        ["plan", "--catalog", str(tmp_path / "cat.toml"), "--demand", "100000", "--slo-p99",
         "2.0", "--out", str(tmp_path / "o"), *FAST],
        capsys,
    )  # fmt: skip
    assert code == 1
    assert "infeasible: short by" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--demand", "10", "--slo-p99", "0"], "SLO must be > 0"),
        (["--demand", "-5", "--slo-p99", "1"], "--demand must be a finite number >= 0"),
        (["--demand", "10", "--slo-p99", "1", "--iterations", "0"], "--iterations must be >= 1"),
        (["--demand", "10", "--slo-p99", "1", "--scheduler", "nope"], "nope"),
        (["--demand-trace", "missing.csv", "--slo-p99", "1"], "demand trace not found"),
    ],
)
def test_plan_cli_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "cat.toml").write_text(CATALOG)
    code, _, err = run(["plan", "--catalog", str(tmp_path / "cat.toml"), *args], capsys)
    assert code == 2
    assert message in err
    assert err.startswith("slmserve plan: error:") and err.count("\n") == 1


def test_plan_cli_catalog_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cat.toml"
    path.write_text('[[type]]\nname = "h100"\nprice_per_hour = 4.0\nmax_count = 2\n')
    code, _, err = run(["plan", "--catalog", str(path), "--demand", "1", "--slo-p99", "1"], capsys)
    assert code == 2 and "'h100' has no profile" in err and err.count("\n") == 1
    code, _, err = run(
        ["plan", "--catalog", "nope.toml", "--demand", "1", "--slo-p99", "1"], capsys
    )
    assert code == 2 and "catalog file not found" in err
    argv = ["plan", "--catalog", str(tmp_path), "--demand", "1", "--slo-p99", "1"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "catalog file is not a file" in err


def test_bench_profile_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in (
        (["--loads", "0.5,x"], "--loads must be comma-separated numbers"),
        (["--loads", "2"], "--loads values must be in (0, 1.5]"),
        (["--shared-prefix", "1.0"], "invalid workload shape"),
        (["--out", "p.txt"], "--out must end in .toml or .json"),
        (["--requests-per-load", "0"], "--requests-per-load must be >= 1"),
    ):
        code, _, err = run(["bench", "profile", *args], capsys)
        assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_bench_profile_on_the_demo_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.toml"
    code, stdout, err = run(
        ["bench", "profile", "--model", "demo", "--device", "cpu", "--prompt-tokens", "32",
         "--output-tokens", "2", "--loads", "0.3,0.6", "--requests-per-load", "12",
         "--saturation-requests", "12", "--torch-threads", "1", "--kv-tokens", "4096",
         "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    profile = read_profile(out)
    assert profile.measured is not None and profile.measured.model == "demo"
    assert profile.measured.device == "cpu" and profile.measured.torch_threads == 1
    assert profile.workload == Shape(prompt_tokens=32, output_tokens=2)
    assert profile.engine.kv_tokens == 4096
    assert [p.load for p in profile.load] == [0.3, 0.6]
    sat = profile.saturation
    assert sat is not None and sat.items_per_s > 0 and sat.sim_items_per_s > 0
    for p in profile.load:
        assert 0 < p.p50 <= p.p99 and p.items_per_s > 0 and p.sim_p99 > 0
    assert profile.fit is not None and profile.fit.steps >= 6
    assert CostModel.load(out) == profile.cost_model
    assert np.isfinite(profile.cost_model.step_overhead)
    assert "saturated" in stdout
