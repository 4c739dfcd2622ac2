"""Profile files, the cost-model fit, catalogs, workload shapes and demand traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slmserve.config import ConfigError
from slmserve.engine.core import ScheduledSeq, StepPlan
from slmserve.engine.sequence import Sequence as Seq
from slmserve.plan.catalog import load_catalog
from slmserve.plan.demand import read_demand_trace
from slmserve.plan.fit import FitQuality, fit_cost_model, nnls, step_features
from slmserve.plan.profile import (
    EngineSetup,
    LoadPoint,
    Profile,
    Provenance,
    Saturation,
    read_profile,
    write_profile,
)
from slmserve.plan.workload import Shape, make_items, request_latencies
from slmserve.schedulers.fcfs import FCFS
from slmserve.sim import CostModel, RequestRecord, SimConfig, simulate
from slmserve.types import SamplingParams

COST = CostModel(
    step_overhead=0.003,
    prefill_token=1e-4,
    prefill_attention=2e-8,
    decode_step=5e-4,
    decode_seq=4e-4,
    decode_context=1e-7,
)


def measured_profile() -> Profile:
    return Profile(
        source="measured by `slmserve bench profile` on test",
        cost_model=COST,
        engine=EngineSetup(kv_tokens=4096, max_batch_tokens=1024, scheduler="lpm"),
        workload=Shape(prompt_tokens=64, shared_prefix=0.25, output_tokens=4),
        measured=Provenance(
            tool="slmserve bench profile",
            command="slmserve bench profile --model demo",
            date="2025-01-01T00:00:00+00:00",
            host="box",
            platform="Linux",
            cpu="Some CPU",
            cpu_count=2,
            device="cpu",
            device_name="Some CPU",
            torch_version="2.5.0",
            torch_threads=1,
            python_version="3.11.0",
            slmserve_version="0.1.0",
            model="demo",
            model_parameters=12345,
            dtype="float32",
            seed=0,
        ),
        fit=FitQuality(steps=100, r2=0.9, median_abs_rel_error=0.1, total_rel_error=0.0),
        saturation=Saturation(
            requests=64,
            seconds=1.5,
            items_per_s=42.0,
            requests_per_s=42.0,
            tokens_per_s=2856.0,
            sim_items_per_s=40.0,
        ),
        load=[
            LoadPoint(
                load=load,
                offered_requests_per_s=42 * load,
                requests=100,
                requests_per_s=41 * load,
                items_per_s=41 * load,
                tokens_per_s=2788 * load,
                p50=0.1 * (1 + load),
                p99=0.3 * (1 + load),
                ttft_p50=0.02,
                ttft_p99=0.05,
                sim_p50=0.11,
                sim_p99=0.33,
            )
            for load in (0.5, 0.9)
        ],
    )


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_profile_writes_and_reads_back(tmp_path: Path, suffix: str) -> None:
    profile = measured_profile()
    path = tmp_path / f"p{suffix}"
    write_profile(profile, path)
    assert read_profile(path) == profile


def test_the_simulator_reads_the_cost_model_of_a_toml_profile(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    write_profile(measured_profile(), path)
    assert CostModel.load(path) == COST


def test_profile_toml_says_where_it_was_measured(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    write_profile(measured_profile(), path)
    text = path.read_text()
    for needle in ("[measured]", 'host = "box"', "[cost_model]", "[[load]]", "[workload]"):
        assert needle in text


def test_profile_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('source = "x"\n[cost_model]\nstep_overhead = -1.0\n')
    with pytest.raises(ConfigError, match=r"p.toml: invalid profile: .*step_overhead"):
        read_profile(path)
    path.write_text('source = "  "\n[cost_model]\n')
    with pytest.raises(ConfigError, match="where the numbers come from"):
        read_profile(path)
    with pytest.raises(ConfigError, match="not found"):
        read_profile(tmp_path / "missing.toml")


def plan_of(*chunks: tuple[int, int, int]) -> StepPlan:
    """Chunks ``(prompt_len, start, n)`` of fresh sequences."""
    items = []
    for i, (prompt_len, start, n) in enumerate(chunks):
        ids = list(range(1, prompt_len + 1))
        seq = Seq(
            f"s{i}", ids, SamplingParams(), arrival_time=0.0, client_id="c", eos_ids=frozenset()
        )
        items.append(ScheduledSeq(seq, start, n, np.zeros(n, np.int64), np.zeros(0), True))
    return StepPlan(now=0.0, items=items)


def test_features_weigh_work_as_the_cost_model_does() -> None:
    rng = np.random.default_rng(0)
    coef = np.array([getattr(COST, k) for k in COST.__struct_fields__])
    for _ in range(50):
        chunks = []
        for _ in range(int(rng.integers(1, 6))):
            prompt = int(rng.integers(2, 300))
            if rng.random() < 0.5:  # a decode: one token past the prompt
                chunks.append((prompt, prompt + int(rng.integers(0, 20)), 1))
            else:
                start = int(rng.integers(0, prompt - 1))
                chunks.append((prompt, start, int(rng.integers(1, prompt - start + 1))))
        plan = plan_of(*chunks)
        assert np.dot(step_features(plan), coef) == pytest.approx(COST.step_time(plan))


def test_fit_recovers_a_known_cost_model() -> None:
    rng = np.random.default_rng(1)
    rows, times = [], []
    for _ in range(400):
        chunks = [(200, int(rng.integers(0, 100)), int(rng.integers(1, 100)))]
        chunks += [(50, 60 + int(rng.integers(0, 200)), 1) for _ in range(int(rng.integers(0, 30)))]
        plan = plan_of(*chunks[: 1 if rng.random() < 0.3 else None])
        rows.append(step_features(plan))
        times.append(COST.step_time(plan) * (1 + 0.01 * rng.standard_normal()))
    fitted, quality = fit_cost_model(rows, times)
    for key in ("step_overhead", "prefill_token", "decode_seq"):
        assert getattr(fitted, key) == pytest.approx(getattr(COST, key), rel=0.1)
    assert quality.r2 > 0.99 and quality.steps == 400
    with pytest.raises(ValueError, match="at least 6"):
        fit_cost_model(rows[:3], times[:3])


def test_nnls_satisfies_the_kkt_conditions() -> None:
    rng = np.random.default_rng(2)
    for _ in range(200):
        a = rng.normal(size=(20, 5)) * rng.choice([1e-6, 1.0, 1e4], size=5)
        b = rng.normal(size=20)
        x = nnls(a, b)
        grad = a.T @ (a @ x - b)  # gradient of ½||ax - b||²
        scale = np.linalg.norm(a, axis=0) * np.linalg.norm(b)
        assert (x >= 0).all()
        assert (grad >= -1e-8 * scale).all()  # no descent direction into the feasible set
        assert np.allclose(grad[x > 0], 0.0, atol=1e-8 * scale.max())


# ---------------------------------------------------------------------------- workload


def test_items_share_their_request_prefix_and_differ_after_it() -> None:
    shape = Shape(prompt_tokens=40, shared_prefix=0.5, output_tokens=3, items_per_request=4)
    work = make_items(shape, 10, seed=0, vocab=100)
    assert len(work.items) == 40 and shape.prefix_len == 20
    first = [r for r in work.items if work.request_of[r.rid] == 0]
    assert all(np.array_equal(r.prompt[:20], first[0].prompt[:20]) for r in first)
    assert all(r.arrival == first[0].arrival for r in first)
    assert all(r.prompt.max() < 100 and r.prompt.min() >= 1 for r in work.items)
    # prefix_groups = 1: every request shares one prefix; 0: each has its own.
    assert all(np.array_equal(r.prompt[:20], first[0].prompt[:20]) for r in work.items)
    own = make_items(Shape(prompt_tokens=40, prefix_groups=0), 10, seed=0)
    assert len({r.prompt[:20].tobytes() for r in own.items}) == 10
    # Rescaling time keeps the requests.
    fast = work.at_rate(4.0)
    assert [r.arrival * 4.0 for r in fast] == pytest.approx([r.arrival for r in work.items])


def test_request_latency_is_its_last_item() -> None:
    recs = [
        RequestRecord(rid="r0.0", client="c", group=None, arrival=1.0, finish=2.0, prompt_tokens=1),
        RequestRecord(rid="r0.1", client="c", group=None, arrival=1.0, finish=3.5, prompt_tokens=1),
        RequestRecord(
            rid="r1.0", client="c", group=None, arrival=2.0, finish=None, prompt_tokens=1
        ),
    ]
    lat = request_latencies(recs, {"r0.0": 0, "r0.1": 0, "r1.0": 1}, 2)
    assert lat[0] == 2.5 and np.isinf(lat[1])


def test_shared_prefix_is_hit_in_the_simulator() -> None:
    shape = Shape(prompt_tokens=64, shared_prefix=0.5, output_tokens=2)
    work = make_items(shape, 50, seed=0)
    result = simulate(work.at_rate(1.0), FCFS(), SimConfig(kv_tokens=8192), COST)
    assert result.prefix_hits >= 49 * 32  # every request after the first hits the prefix


def test_shape_rejects_bad_values() -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"shared_prefix": 1.0}, Shape)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"prompt_tokens": 0}, Shape)


# ---------------------------------------------------------------------------- catalog


INLINE = """
[[type]]
name = "{name}"
price_per_hour = {price}
max_count = 3
[type.profile]
source = "hand-entered, not measured: test"
[type.profile.cost_model]
step_overhead = 0.001
"""


def test_catalog_with_a_measured_file_and_an_inline_profile(tmp_path: Path) -> None:
    write_profile(measured_profile(), tmp_path / "cpu.toml")
    (tmp_path / "cat.toml").write_text(
        '[[type]]\nname = "cpu"\nprice_per_hour = 0.1\nmax_count = 8\ngpus_per_replica = 0\n'
        'profile = "cpu.toml"\n' + INLINE.format(name="gpu", price=4.0)
    )
    cat = load_catalog(tmp_path / "cat.toml")
    assert [t.name for t in cat.types] == ["cpu", "gpu"]
    assert cat.types[0].profile == measured_profile()
    assert cat.types[0].profile_path == str(tmp_path / "cpu.toml")
    assert cat.types[1].profile.source.startswith("hand-entered")
    assert cat.types[1].gpus_per_replica == 1 and cat.types[1].profile_path is None
    assert cat.shape == measured_profile().workload  # from the measured profile


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[type]]\nname = "a"\nprice_per_hour = 1.0\nmax_count = 2\n', "'a' has no profile"),
        (INLINE.format(name="a", price=-1.0), r"type 'a': Expected `float` >= 0.0"),
        (INLINE.format(name="a", price=1.0).replace('source = "hand-entered, not measured: '
                                                    'test"', ""), "needs `source`"),
        (INLINE.format(name="a", price=1) * 2, "'a' is listed twice"),
        ('[[type]]\nname = "a"\nprice_per_hour = 1.0\nmax_count = 2\nprofile = "nope.toml"\n',
         "type 'a': profile file not found"),
        ("", "no instance types"),
        ('[types]\nname = "a"\n', "unknown table"),
    ],
)  # fmt: skip
def test_catalog_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cat.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_catalog(path)


def test_catalog_needs_a_workload_when_no_profile_records_one(tmp_path: Path) -> None:
    path = tmp_path / "cat.toml"
    path.write_text(INLINE.format(name="a", price=1.0))
    with pytest.raises(ConfigError, match=r"no \[workload\] table"):
        load_catalog(path)
    path.write_text("[workload]\nprompt_tokens = 32\n" + INLINE.format(name="a", price=1.0))
    assert load_catalog(path).shape == Shape(prompt_tokens=32)


# ---------------------------------------------------------------------------- demand traces


def test_demand_traces_csv_and_jsonl(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("period,demand\n00:00,10\n01:00,12.5\n")
    assert read_demand_trace(csv) == [("00:00", 10.0), ("01:00", 12.5)]
    csv.write_text("demand\n3\n4\n")
    assert read_demand_trace(csv) == [("0", 3.0), ("1", 4.0)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"period": "a", "demand": 1}\n\n{"demand": 2}\n')
    assert read_demand_trace(jsonl) == [("a", 1.0), ("1", 2.0)]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("d.csv", "hour,load\n1,2\n", "needs a 'demand' column"),
        ("d.csv", "demand\n-1\n", r"d.csv:2: demand must be a finite number >= 0"),
        ("d.csv", "demand\nabc\n", r"d.csv:2: demand must be a number"),
        ("d.jsonl", '{"demand": 1}\n{oops\n', r"d.jsonl:2: not valid JSON"),
        ("d.jsonl", '{"load": 1}\n', r'd.jsonl:1: expected an object with a "demand"'),
        ("d.csv", "demand\n", "has no periods"),
    ],
)
def test_demand_trace_errors_name_the_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_demand_trace(path)
