"""``benchmarks/overlap.py`` runs end to end on a tiny burst, so the script cannot rot, and its
simulated device really is the bottleneck it claims: with overlap off, the device is idle
while the host works."""

from __future__ import annotations

import re

from benchmark_scripts import run_benchmark


def test_overlap_benchmark_prints_its_tables() -> None:
    args = ["--requests", "12", "--rounds", "1", "--device-rates", "3000", "--no-cpu-model"]
    args += ["--concurrency", "8", "--decode-step-ms", "3"]
    out = run_benchmark("overlap.py", *args)
    row = re.search(
        r"^\| 3,000 \| ([\d,]+) \| ([\d,]+) \| [\d.]+x \| (\d+)% / (\d+)% \| [\d,]+ \| [\d,]+ \|$",
        out,
        re.M,
    )
    assert row, out
    off, on, busy_off, busy_on = (int(x.replace(",", "")) for x in row.groups())
    assert off > 0 and on > 0
    assert 0 < busy_off < 100 and 0 < busy_on <= 100
    generation = re.search(
        r"^\| 8 \| 3 \| ([\d,]+) \| ([\d,]+) \| [\d.]+x \| (\d+)% / (\d+)% \|$", out, re.M
    )
    assert generation, out
    off, on, busy_off, busy_on = (int(x.replace(",", "")) for x in generation.groups())
    assert off > 0 and on > 0
    assert 0 < busy_off < 100 and 0 < busy_on <= 100
