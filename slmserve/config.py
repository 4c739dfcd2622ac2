"""Engine settings as one msgspec Struct, layered: defaults < TOML file < CLI flags.

Validation happens in one place (``msgspec.convert``), so a bad value anywhere — a TOML typo, a
CLI flag, a Python keyword — produces the same message naming the field.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PosInt = Annotated[int, msgspec.Meta(ge=1)]
Fraction = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]

DEFAULT_CPU_KV_TOKENS = 131_072
"""KV slots on CPU when no budget is given (host RAM is shared with everything else)."""


_DICT_FIELDS = ("backend_options", "scheduler_options")


class ConfigError(ValueError):
    """A setting is invalid; the message names the field."""


class EngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything the engine needs to start. Field docs double as ``--help`` text."""

    model: str | None = None
    """Checkpoint directory; ``None`` or ``"demo"`` selects the embedded demo model."""
    backend: str = "native"
    backend_options: dict[str, Any] = msgspec.field(default_factory=dict)
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    scheduler: str = "fcfs"
    scheduler_options: dict[str, Any] = msgspec.field(default_factory=dict)
    kv_tokens: PosInt | None = None
    """KV pool size in tokens. Default: a fraction of free GPU memory on CUDA, 131072 on CPU."""
    kv_memory_fraction: Fraction = 0.85
    """Fraction of free device memory (after loading weights) given to KV, on CUDA."""
    max_batch_tokens: PosInt = 2048
    """Token budget per step: decode tokens plus prefill chunks."""
    chunked_prefill_size: PosInt = 512
    """Largest prefill chunk one request may take in one step."""
    max_running_requests: PosInt = 256
    max_waiting_requests: PosInt = 4096
    """Bound on the waiting queue; ``submit`` raises ``QueueFullError`` beyond it."""
    max_model_len: PosInt | None = None
    """Longest prompt + output; default: the model's ``max_position_embeddings``."""
    seed: int = 0
    torch_threads: PosInt | None = None
    """CPU threads for torch's operators (``None``: torch's default, one per core). On small
    CPU hosts ``cores - 1`` leaves a core for the event loop."""
    gc_freeze: bool = True
    """``gc.freeze()`` after start-up so long-lived objects never get scanned again, and a
    slower collector pace for what is allocated after (``engine.GC_THRESHOLDS``). Both are
    process-wide settings of Python's garbage collector."""
    model_thread: bool = True
    """Run each step's forward pass in a worker thread, so the event loop (HTTP handlers that
    share it) stays responsive while the model computes. The engine process of ``slmserve
    serve`` turns it off: nothing else needs its loop, and a thread hand-off per step plus the
    two threads contending for the interpreter lock cost more than they give."""
    cuda_graphs: bool = True
    """On CUDA, capture the decode forward as CUDA graphs at start-up (batch sizes 1, 2, 4, 8,
    16, 32, ... up to ``max_running_requests``) and replay them; needs a backend that supports
    it (the native backend on its Triton attention path). No effect on the CPU."""
    overlap: Literal["auto", "on", "off"] = "auto"
    """Plan and launch the next step while the device still runs this one: the host's
    bookkeeping then hides behind the device's work instead of adding to it. A decode in the
    next step reads the token this one samples on the device; when that token ends its request
    the decode is discarded. ``auto``: on for CUDA, where launches are asynchronous; on the CPU
    the forward pass is the launch, so there is nothing to hide."""

    def replace(self, **changes: Any) -> EngineConfig:
        """A validated copy with ``changes`` applied."""
        return load_config(overrides={**msgspec.to_builtins(self), **changes})


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> EngineConfig:
    """Build a config from an optional TOML file and explicit overrides (``None`` values skipped).

    TOML may hold the fields at the top level or under an ``[engine]`` table.
    """
    data: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path)
        # Engine fields live at the top level or under [engine]; other tables ([server], …)
        # belong to other components.
        top = {k: v for k, v in raw.items() if not isinstance(v, dict) or k in _DICT_FIELDS}
        data.update(raw.get("engine", top))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(data, EngineConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid engine config: {exc}") from None


def require_file(path: str | Path, what: str) -> Path:
    """``path``, or a ``ConfigError`` saying it is missing or not a file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{what} is not a file: {path}")
    return path


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed file, or a ``ConfigError`` naming the file and the problem."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["k=4", "mode=ideal"]`` -> ``{"k": 4, "mode": "ideal"}`` (values read as TOML)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"option {pair!r} must look like KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------- plugin options
# Scheduler, router and other plugin factories validate their ``**options`` with these, so a
# bad ``--scheduler-opt``/``--policy-opt`` (TOML-parsed, or a plain string) gets one message
# shape everywhere. ``kind`` names what the option belongs to in that message.


def int_option(name: str, value: Any, *, minimum: int, kind: str = "scheduler") -> int:
    """An integer option (``"4"`` is accepted); errors name it."""
    error = ValueError(f"{kind} option {name!r} must be an integer, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise error from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise error
    if value < minimum:
        raise ValueError(f"{kind} option {name!r} must be >= {minimum}, got {value}")
    return value


def number_option(
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    strict: bool = False,
    finite: bool = True,
    kind: str = "scheduler",
) -> float:
    """A real-valued option (numeric strings accepted); ``strict`` excludes the minimum."""
    error = ValueError(f"{kind} option {name!r} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise error from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error
    value = float(value)
    if finite and (math.isnan(value) or math.isinf(value)):
        raise ValueError(f"{kind} option {name!r} must be finite, got {value}")
    if math.isnan(value) or value < minimum or (strict and value == minimum):
        bound = ">" if strict else ">="
        raise ValueError(f"{kind} option {name!r} must be {bound} {minimum}, got {value}")
    return value


def choice_option(name: str, value: Any, choices: tuple[str, ...], kind: str = "scheduler") -> str:
    if value not in choices:
        raise ValueError(f"{kind} option {name!r} must be one of {choices}, got {value!r}")
    return str(value)
