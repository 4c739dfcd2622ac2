"""``benchmarks/overlap.py`` runs end to end on a tiny burst, so the script cannot rot, and its
simulated device really is the bottleneck it claims: with overlap off, the device is idle
while the host works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_overlap_benchmark_prints_its_table() -> None:
    args = ["--requests", "12", "--rounds", "1", "--device-rates", "3000", "--no-cpu-model"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overlap.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = re.search(
        r"^\| 3,000 \| ([\d,]+) \| ([\d,]+) \| [\d.]+x \| (\d+)% / (\d+)% \| [\d,]+ \| [\d,]+ \|$",
        proc.stdout,
        re.M,
    )
    assert row, proc.stdout
    off, on, busy_off, busy_on = (int(x.replace(",", "")) for x in row.groups())
    assert off > 0 and on > 0
    assert 0 < busy_off < 100 and 0 < busy_on <= 100
