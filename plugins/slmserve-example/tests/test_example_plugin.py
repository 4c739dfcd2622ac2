"""The example plugin orders requests correctly and is found through its entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from slmserve_example.plugin import ShortestPromptFirst

from slmserve import SchedRequest
from slmserve.plugins import PluginManager


def _req(rid: str, length: int, matched: int, arrival: float) -> SchedRequest:
    r = SchedRequest(rid, list(range(length)), arrival_time=arrival)
    r.matched_len = matched
    return r


def test_orders_by_uncached_length_then_arrival() -> None:
    reqs = [
        _req("a", 10, 0, 0.0),  # 10 uncached, oldest
        _req("b", 50, 40, 1.0),  # 10 uncached: the cached part does not count
        _req("c", 5, 0, 2.0),
        _req("d", 5, 0, 1.5),
    ]
    order = [r.rid for r in ShortestPromptFirst().order(reqs, now=3.0)]
    assert order == ["d", "c", "a", "b"]


def test_discovered_through_entry_point() -> None:
    pm = PluginManager(load_entrypoints=True)
    assert "spf" in pm.schedulers
    entry = next(e for e in pm.schedulers.entries() if e.name == "spf")
    assert entry.plugin == "example"
    assert entry.distribution == "slmserve-example"
    assert pm.schedulers.get("spf") is ShortestPromptFirst


def test_listed_by_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "slmserve", "plugins", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    names = {e["name"]: e for e in json.loads(out)["schedulers"]}
    assert names["spf"]["distribution"] == "slmserve-example"
