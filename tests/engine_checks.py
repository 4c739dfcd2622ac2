"""Checks on an engine's state that several test modules make."""

from __future__ import annotations

from typing import Any


def assert_clean(engine: Any) -> None:
    """Nothing running, nothing locked, every slot either free or in the tree."""
    core = engine.core
    assert core is not None
    core.check_integrity()
    assert not core.running and not core.waiting
    assert core.cache.protected_size == 0
    assert engine.kv.allocator.num_free + core.cache.total_size == engine.kv.num_slots
