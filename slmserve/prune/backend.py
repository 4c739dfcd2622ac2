"""Built-in ``osscar`` backend: the native decoder for checkpoints from ``slmserve prune``.

The native decoder already runs per-layer widths (``layer_shapes`` in ``config.json``), so
``native`` serves every pruned checkpoint, uniform or not. ``osscar`` is the same decoder plus a
check that the directory really is a pruned checkpoint (``config.json`` carries
``slmserve.pruning``), and a model description that says how it was pruned. Pick it when a
deployment must refuse an unpruned model by mistake; otherwise either works.

Cheap to import (``slmserve plugins`` loads it): torch and the loader load inside the factory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmserve.hookspecs import hookimpl
from slmserve.plugins import Registry

if TYPE_CHECKING:
    from slmserve.models.loader import NativeBackend


def osscar_backend(
    model_path: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    **options: Any,
) -> NativeBackend:
    """Native decoder for OSSCAR-pruned checkpoints (per-layer widths; checks the metadata)."""
    if options:
        raise TypeError(f"unknown osscar backend options: {', '.join(sorted(options))}")
    import msgspec

    from slmserve.models.loader import UnsupportedModelError, load_model, read_config

    if model_path in (None, "demo"):
        raise UnsupportedModelError(
            "the osscar backend serves a checkpoint written by `slmserve prune`; give --model DIR"
        )
    cfg = read_config(model_path)
    meta = (cfg.get("slmserve") or {}).get("pruning")
    if not isinstance(meta, dict):
        raise UnsupportedModelError(
            f"{Path(model_path) / 'config.json'} has no slmserve.pruning metadata, so it was not "
            "written by `slmserve prune`; serve it with --backend native"
        )
    backend = load_model(model_path, device=device, dtype=dtype)
    method = meta.get("method", "?")
    ratio = meta.get("parameters_after", 0) / max(meta.get("parameters_before", 0), 1)
    backend.info = msgspec.structs.replace(
        backend.info,
        description=f"{backend.info.architecture} pruned with {method} "
        f"({ratio:.0%} of the parameters) from {model_path}",
    )
    return backend


@hookimpl
def slmserve_register_backends(registry: Registry) -> None:
    registry.add(
        "osscar",
        osscar_backend,
        description="native decoder for checkpoints written by slmserve prune",
    )
