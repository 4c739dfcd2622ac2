"""Run a script of ``benchmarks/`` the way a user does, for the tests that keep them working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: float = 300) -> str:
    """``python benchmarks/<script> <args>`` from the repository root; its stdout. A non-zero
    exit fails the calling test with the end of stderr."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
