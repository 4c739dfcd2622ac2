"""Server settings (address, auth, limits), layered like the engine's: defaults < TOML < flags.

They live apart from :class:`~slmserve.config.EngineConfig` because an embedder may run an engine
with no HTTP server at all; a TOML file holds both, the server part in a ``[server]`` table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import msgspec

from slmserve.config import ConfigError, read_toml

PosInt = Annotated[int, msgspec.Meta(ge=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0)]

API_KEY_ENV = "SLMSERVE_API_KEY"


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything the HTTP layer needs; the engine's own limits stay in ``EngineConfig``."""

    host: str = "127.0.0.1"
    port: Port = 8000
    """``0`` picks a free port (the start-up log line says which)."""
    api_key: str | None = None
    """When set, every route except ``/health``, ``/ready`` and ``/metrics`` needs
    ``Authorization: Bearer <key>``. Also read from ``$SLMSERVE_API_KEY``."""
    served_model_name: str | None = None
    """The ``model`` name clients use; default ``demo`` or the ``--model`` argument as given."""
    max_body_bytes: PosInt = 4 * 1024 * 1024
    """Largest request body; bigger ones get 413 before any parsing."""
    max_choices: PosInt = 128
    """Most engine requests one HTTP request may create (prompts x ``n``)."""
    shutdown_timeout: Seconds = 30.0
    """On SIGTERM/SIGINT: how long in-flight requests may take to finish before being aborted."""
    access_log: bool = False
    """One log line per HTTP request (aiohttp's access log)."""
    max_score_items: PosInt = 1024
    """Most items one ``/v1/score`` request may carry."""
    max_score_item_chars: PosInt = 100_000
    """Longest item text (characters, checked before compression) for ``/v1/score``."""
    max_score_item_tokens: PosInt | None = None
    """Longest item (tokens, after compression); ``None``: only the model's context bounds it."""
    score_template: str | None = None
    """Default ``/v1/score`` prompt template (``{query}``, ``{item}``); a request may override."""
    score_compressors: list[dict[str, Any]] = msgspec.field(default_factory=list)
    """Default compressor chain for ``/v1/score`` (``[{name = "extractive", options = {...}}]``)
    when a request names none; a request's ``compressor`` replaces it (``[]`` turns it off)."""

    engine_cpus: str | None = None
    """CPUs for the engine process, as ``taskset`` writes them (``"1"``, ``"2-7"``, ``"0,2"``;
    Linux). The HTTP front gets the others. Keeps the two from being moved onto one core and
    waiting for each other; leave unset when the engine computes on the CPU with many threads.
    Unset: no pinning."""

    def replace(self, **changes: Any) -> ServerConfig:
        """A validated copy with ``changes`` applied (``None`` values skipped)."""
        return load_server_config(overrides={**msgspec.to_builtins(self), **changes})


def load_server_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    environ: dict[str, str] | None = None,
) -> ServerConfig:
    """Defaults < ``[server]`` table of the TOML file < ``$SLMSERVE_API_KEY`` < ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        table = read_toml(path).get("server", {})
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [server] must be a table")
        data.update(table)
    env = os.environ if environ is None else environ
    if env.get(API_KEY_ENV):
        data["api_key"] = env[API_KEY_ENV]
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(data, ServerConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid server config: {exc}") from None


def parse_cpus(text: str) -> set[int]:
    """``"0,2-3"`` -> ``{0, 2, 3}``; ``ConfigError`` for bad syntax, CPUs the machine does
    not have, or a list that takes them all (the HTTP front needs one)."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ConfigError(
            f"engine_cpus: {text!r} is not a CPU list like '1', '2-7' or '0,2'"
        ) from None
    machine = set(range(os.cpu_count() or 1))
    if not cpus or not cpus <= machine:
        raise ConfigError(f"engine_cpus: {text!r} names CPUs outside 0-{len(machine) - 1}")
    if cpus == machine:
        raise ConfigError(f"engine_cpus: {text!r} leaves no CPU for the HTTP front")
    return cpus
