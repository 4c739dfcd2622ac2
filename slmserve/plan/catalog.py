"""The catalog: instance types a fleet can be built from, each with a profile.

```toml
[workload]                      # optional when the measured profiles agree on one shape
prompt_tokens = 256
shared_prefix = 0.5
output_tokens = 16

[[type]]
name = "cpu-2core"
price_per_hour = 0.10           # USD (or any currency, used consistently)
gpus_per_replica = 0
max_count = 16                  # availability cap
profile = "cpu.profile.toml"    # measured by `slmserve bench profile` (relative to the catalog)

[[type]]
name = "h100"
price_per_hour = 4.5
gpus_per_replica = 1
max_count = 4
[type.profile]                  # entered by hand: `source` is mandatory
source = "hand-entered, not measured: ..."
[type.profile.cost_model]
step_overhead = 0.004
```

A type without a profile is an error: the planner never invents throughput.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from slmserve.config import ConfigError, read_toml, require_file
from slmserve.plan.profile import Profile, convert_profile, read_profile
from slmserve.plan.workload import Shape

NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


class _TypeEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    price_per_hour: NonNegFloat
    max_count: NonNegInt
    gpus_per_replica: NonNegInt = 1
    profile: str | dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class InstanceType:
    name: str
    price_per_hour: float
    gpus_per_replica: int
    max_count: int
    profile: Profile
    profile_path: str | None
    """The profile file, or ``None`` when entered inline in the catalog."""


@dataclass(frozen=True, slots=True)
class Catalog:
    types: list[InstanceType]
    shape: Shape
    path: str


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog; every error names the file and the type."""
    path = require_file(path, "catalog file")
    raw = read_toml(path)
    unknown = set(raw) - {"workload", "type"}
    if unknown:
        raise ConfigError(f"catalog {path}: unknown table(s) {sorted(unknown)}; use [[type]]")
    entries = raw.get("type")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"catalog {path}: no instance types; add [[type]] tables")
    types = [_instance_type(entry, i, path) for i, entry in enumerate(entries)]
    names = [t.name for t in types]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"catalog {path}: instance type {dup[0]!r} is listed twice")
    return Catalog(types, _shape(raw.get("workload"), types, path), str(path))


def _instance_type(raw: Any, index: int, path: Path) -> InstanceType:
    label = raw.get("name", f"#{index + 1}") if isinstance(raw, dict) else f"#{index + 1}"
    where = f"catalog {path}: type {label!r}"
    try:
        entry = msgspec.convert(raw, _TypeEntry)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not entry.name.strip():
        raise ConfigError(f"catalog {path}: type #{index + 1} has an empty name")
    if entry.profile is None:
        raise ConfigError(
            f'{where} has no profile: give profile = "FILE" (measured with `slmserve bench '
            "profile`) or an inline [type.profile] with `source` and [type.profile.cost_model]; "
            "the planner never invents throughput"
        )
    if isinstance(entry.profile, str):
        file = Path(entry.profile)
        file = file if file.is_absolute() else path.parent / file
        try:
            profile = read_profile(file)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        profile_path: str | None = str(file)
    else:
        if "source" not in entry.profile:
            raise ConfigError(
                f"{where}: an inline profile needs `source` saying where its numbers come from "
                '(e.g. "hand-entered, not measured: <reasoning>")'
            )
        profile = convert_profile(entry.profile, where)
        profile_path = None
    return InstanceType(
        entry.name, entry.price_per_hour, entry.gpus_per_replica, entry.max_count, profile,
        profile_path,
    )  # fmt: skip


def _shape(raw: Any, types: list[InstanceType], path: Path) -> Shape:
    """The catalog's ``[workload]``, else the one shape its profiles were measured on."""
    if raw is not None:
        try:
            return msgspec.convert(raw, Shape)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"catalog {path}: [workload]: {exc}") from None
    shapes = {t.profile.workload for t in types if t.profile.workload is not None}
    if len(shapes) == 1:
        return shapes.pop()
    if not shapes:
        raise ConfigError(
            f"catalog {path}: no [workload] table and no profile records a workload shape; "
            "add [workload] with prompt_tokens, shared_prefix, output_tokens"
        )
    raise ConfigError(
        f"catalog {path}: the profiles were measured on different workload shapes; "
        "add a [workload] table saying which one to plan for"
    )
