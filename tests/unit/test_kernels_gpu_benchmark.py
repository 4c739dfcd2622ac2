"""``benchmarks/gpu.py --smoke`` runs end to end on the CPU, so the GPU script cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_benchmark_smoke_prints_both_tables() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    scoring = re.search(r"^\| smoke \| (\d+) \| (\d+) \| [\d.]+x \| (\d+) \| \d+% \|$", out, re.M)
    assert scoring, out
    assert all(int(x) > 0 for x in scoring.groups())
    generation = re.findall(r"^\| smoke \| (\d+) \| (\d+) \| (\d+) \| [\d.]+x \|$", out, re.M)
    assert [int(n) for n, _, _ in generation] == [2, 4], out
    assert all(int(ours) > 0 and int(theirs) > 0 for _, ours, theirs in generation)


def test_gpu_benchmark_without_cuda_says_what_to_do() -> None:
    """A plain run on a machine without CUDA is a one-line usage error, not a traceback."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    if gpu.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        gpu.parse_args([])
    assert exc.value.code == 2
