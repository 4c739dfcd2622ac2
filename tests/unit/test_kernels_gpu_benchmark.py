"""``benchmarks/gpu.py``: the smoke run end to end on the CPU (so the GPU script cannot rot),
and its load-sweep logic with fake scorers (so the one GPU run measures what it claims)."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from benchmark_scripts import run_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _gpu_module() -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu


def _args(**changes: object) -> argparse.Namespace:
    base = {"items": 2, "item_tokens": 3, "query_tokens": 4, "duration": 0.05, "min_requests": 4}
    return argparse.Namespace(**{**base, **changes})


@pytest.mark.slow
def test_gpu_benchmark_smoke_prints_both_tables() -> None:
    out = run_benchmark("gpu.py", "--smoke", "--overlap", "on")  # on, as on CUDA
    scoring = re.search(
        r"^\| smoke \| (\d+) \| (\d+) \| [\d.]+x \| (\d+) \| (\d+) \| (\d+) \| \d+% \| "
        r"([\d.]+) \|$",
        out,
        re.M,
    )
    assert scoring, out
    *rates, diff = scoring.groups()
    assert all(int(x) > 0 for x in rates)
    assert float(diff) < 1e-3, "float32 on the CPU: both systems compute the same scores"
    generation = re.findall(
        r"^\| smoke \| (\d+) \| (\d+) \| (\d+) \| [\d.]+x \| (\d+) \| [\d.]+x \|$", out, re.M
    )
    assert [int(n) for n, *_ in generation] == [2, 4], out
    assert all(int(rate) > 0 for row in generation for rate in row[1:])
    phases = ("build model", "slmserve capacity probe", "transformers load sweep",
              "slmserve generation, overlap off")  # fmt: skip
    for phase in phases:
        assert re.search(rf"^  \[ *[\d.]+ s\] {phase}$", out, re.M), phase


def test_gpu_benchmark_without_cuda_says_what_to_do() -> None:
    """A plain run on a machine without CUDA is a one-line usage error, not a traceback."""
    gpu = _gpu_module()
    if gpu.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        gpu.parse_args([])
    assert exc.value.code == 2


def test_sweep_stops_at_the_first_level_over_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Levels run in order; the first with P99 >= bound ends the sweep and does not count."""
    gpu = _gpu_module()
    monkeypatch.setattr(gpu, "P99_BOUND", 0.03)
    args = _args(fractions=[0.5, 0.7, 0.85, 1.0])
    slow = {tuple(q) for q, _ in gpu.make_requests(200, args, 100, gpu.LEVEL_SEED + 2)}

    async def score(req: tuple[list[int], list[list[int]]]) -> list[float]:
        await asyncio.sleep(0.05 if tuple(req[0]) in slow else 0.0)
        return [0.5] * len(req[1])

    best, rows = asyncio.run(gpu.sweep("fake", score, args, 100, capacity=400.0))
    assert [round(r[0]) for r in rows] == [200, 280, 340]  # offered: fractions of capacity
    assert rows[2][3] >= 0.03 > max(rows[0][3], rows[1][3])
    assert best == max(rows[0][1], rows[1][1]) > 0


def test_probe_grows_bursts_until_one_lasts_long_enough(capsys: pytest.CaptureFixture) -> None:
    """A scorer that serves one request per ~2 ms: the probe's answer is about 500 requests/s
    (never more), from a burst that lasted at least ``probe_seconds``."""
    gpu = _gpu_module()
    args = _args(probe_start=2, probe_seconds=0.1, probe_max=10_000)

    async def run() -> float:
        lock = asyncio.Lock()

        async def score(req: tuple[list[int], list[list[int]]]) -> list[float]:
            async with lock:
                await asyncio.sleep(0.002)
            return [0.5] * len(req[1])

        return await gpu.probe("fake", score, args, 100)

    rate = asyncio.run(run())
    assert 0.2 * 500 * args.items < rate <= 500 * args.items
    bursts = re.findall(r"burst +(\d+) requests .* in +([\d.]+) s", capsys.readouterr().out)
    sizes = [int(n) for n, _ in bursts]
    assert sizes[0] == 2 and sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert float(bursts[-1][1]) >= args.probe_seconds > float(bursts[-2][1])


@pytest.mark.slow
def test_gpu_kernels_smoke_checks_every_tile_and_prints_the_model() -> None:
    """``gpu_kernels.py --smoke`` runs every attention tile under the interpreter (each must
    compute what the default does and what the torch path does) and prints both tables."""
    out = run_benchmark("gpu_kernels.py", "--smoke")
    tiles = re.findall(
        r"^\| (?:triton|tile) \| extend attention (\d+)x(\d+), (\d) warps(, packed GQA)? \|",
        out,
        re.M,
    )
    assert len(tiles) >= 4 and any(packed for *_, packed in tiles), out
    model = re.findall(r"^\| (triton|torch) \| [\d,]+ \| [\d,.]+ \| [\d,]+ \|$", out, re.M)
    assert model == ["triton", "torch"], out
