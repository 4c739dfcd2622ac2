"""Demand traces: one demand (items/s) per period, e.g. the peak of every hour.

CSV with a header naming a ``demand`` column and optionally a ``period`` column (any label, e.g.
``2025-06-01T13:00``); without ``period`` the rows are numbered from 0. Or JSONL, one object per
line: ``{"period": "13:00", "demand": 850.0}``. Errors name the file and line.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from slmserve.config import ConfigError, require_file


def read_demand_trace(path: str | Path) -> list[tuple[str, float]]:
    path = require_file(path, "demand trace")
    rows = _jsonl(path) if path.suffix in (".jsonl", ".json") else _csv(path)
    if not rows:
        raise ConfigError(f"demand trace {path} has no periods")
    return rows


def _demand(value: Any, where: str) -> float:
    try:
        demand = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: demand must be a number, got {value!r}") from None
    if not demand >= 0 or math.isinf(demand):
        raise ConfigError(f"{where}: demand must be a finite number >= 0, got {value!r}")
    return demand


def _csv(path: Path) -> list[tuple[str, float]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "demand" not in fields:
            raise ConfigError(f"{path}: the CSV header needs a 'demand' column, got {fields}")
        rows = []
        for i, row in enumerate(reader):
            row = {k.strip(): v for k, v in row.items() if k is not None}
            where = f"{path}:{reader.line_num}"
            label = (row.get("period") or "").strip() or str(i)
            rows.append((label, _demand(row.get("demand"), where)))
    return rows


def _jsonl(path: Path) -> list[tuple[str, float]]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or "demand" not in obj:
            raise ConfigError(f'{where}: expected an object with a "demand" number')
        rows.append((str(obj.get("period", len(rows))), _demand(obj["demand"], where)))
    return rows
