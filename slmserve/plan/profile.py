"""The profile file: what one replica of an instance type can do, and where that came from.

A profile written by ``slmserve bench profile`` records how, when and where it was measured
(``[measured]``), the workload shape and engine limits, the measured throughput and latency at
each offered load (``[[load]]``, with the simulator's prediction for the same requests next to
it) and the :class:`CostModel` fitted to the measured step times (``[cost_model]``, which
``CostModel.load`` reads directly). A hand-entered profile needs only ``source`` (who says so,
and why) and ``[cost_model]``: the planner never runs on numbers without a stated source.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec

from slmserve.config import ConfigError, read_toml, require_file
from slmserve.plan.fit import FitQuality
from slmserve.plan.workload import PosInt, Shape
from slmserve.sim.simulator import CostModel, SimConfig


class Provenance(msgspec.Struct, kw_only=True):
    """How, when and where a profile was measured."""

    tool: str
    command: str
    date: str
    """ISO 8601, UTC."""
    host: str
    platform: str
    cpu: str
    cpu_count: int
    device: str
    device_name: str
    torch_version: str
    torch_threads: int
    python_version: str
    slmserve_version: str
    model: str
    model_parameters: int
    dtype: str
    seed: int


class EngineSetup(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The engine limits (and scheduler) a replica runs with; the simulator uses the same."""

    kv_tokens: PosInt = 65_536
    max_batch_tokens: PosInt = 2048
    chunked_prefill_size: PosInt = 512
    max_running_requests: PosInt = 256
    scheduler: str = "fcfs"

    def sim_config(self) -> SimConfig:
        return SimConfig(
            kv_tokens=self.kv_tokens,
            max_batch_tokens=self.max_batch_tokens,
            chunked_prefill_size=self.chunked_prefill_size,
            max_running_requests=self.max_running_requests,
        )


class Saturation(msgspec.Struct, kw_only=True):
    """Everything submitted at once: the most the engine serves (the unit of ``load``)."""

    requests: int
    seconds: float
    items_per_s: float
    requests_per_s: float
    tokens_per_s: float
    sim_items_per_s: float
    """The fitted simulator's throughput on the same requests, submitted at once."""


class LoadPoint(msgspec.Struct, kw_only=True):
    """One offered load: Poisson arrivals at ``load`` x the saturated request rate."""

    load: float
    offered_requests_per_s: float
    requests: int
    requests_per_s: float
    items_per_s: float
    tokens_per_s: float
    p50: float
    """Request latency (arrival -> last item finished), seconds."""
    p99: float
    ttft_p50: float
    ttft_p99: float
    sim_p50: float
    """The fitted simulator's request latency for the same requests and arrival times."""
    sim_p99: float


class Profile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    source: str
    """Where the numbers come from, in words (measured: by which command; hand-entered: why)."""
    cost_model: CostModel
    engine: EngineSetup = msgspec.field(default_factory=EngineSetup)
    workload: Shape | None = None
    measured: Provenance | None = None
    fit: FitQuality | None = None
    saturation: Saturation | None = None
    load: list[LoadPoint] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise ValueError("profile source must say where the numbers come from")


def convert_profile(raw: Any, where: str) -> Profile:
    """A validated :class:`Profile` from parsed TOML/JSON; errors name ``where``."""
    try:
        return msgspec.convert(raw, Profile)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid profile: {exc}") from None


def read_profile(path: str | Path) -> Profile:
    """Read a profile from ``.toml`` or ``.json``."""
    path = require_file(path, "profile file")
    if path.suffix == ".toml":
        raw = read_toml(path)
    else:
        try:
            raw = msgspec.json.decode(path.read_bytes())
        except msgspec.DecodeError as exc:
            raise ConfigError(f"profile {path} is not valid JSON: {exc}") from None
    return convert_profile(raw, str(path))


def write_profile(profile: Profile, path: str | Path) -> None:
    """Write ``.toml`` (default) or ``.json`` (by suffix)."""
    path = Path(path)
    data = msgspec.to_builtins(profile)
    if path.suffix == ".json":
        path.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=1) + b"\n")
    else:
        header = (
            "# slmserve capacity profile; the [cost_model] table is what CostModel.load reads\n"
        )
        path.write_text(header + dump_toml(data))


# ---------------------------------------------------------------------------- TOML out


def dump_toml(data: dict[str, Any]) -> str:
    """TOML for nested dicts, lists of dicts (arrays of tables) and scalars; ``None`` skipped."""
    lines: list[str] = []
    _table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(data: dict[str, Any], path: list[str], lines: list[str]) -> None:
    subtables = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict) or (
            isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        ):
            subtables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables:
        name = ".".join(_key(k) for k in [*path, key])
        for table in value if isinstance(value, list) else [value]:
            lines.extend(["", f"[[{name}]]" if isinstance(value, list) else f"[{name}]"])
            _table(table, [*path, key], lines)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
