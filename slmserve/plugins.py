"""Plugin manager: built-ins plus entry-point plugins, and the name -> factory registries.

One :class:`PluginManager` per engine or application (never a module global), so tests and
embedders can build several side by side.

Environment switches:

* ``SLMSERVE_DISABLE_PLUGIN_AUTOLOAD=1`` — do not load third-party entry points.
* ``SLMSERVE_DISABLE_PLUGINS=a,b`` — block the named plugins (built-in or third-party).
* ``SLMSERVE_TRACE_PLUGINS=1`` — log every hook call with its arguments and results.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

import pluggy

from slmserve import hookspecs
from slmserve.interfaces import PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "slmserve"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "slmserve.schedulers.fcfs",
    "slmserve.schedulers.lpm",
    "slmserve.schedulers.klpm",
    "slmserve.schedulers.vtc",
    "slmserve.schedulers.dlpm",
    "slmserve.compressors.truncate",
    "slmserve.compressors.extractive",
    "slmserve.compressors.summary",
    "slmserve.models.native",
    "slmserve.models.null",
    "slmserve.prune.backend",
    "slmserve.routing.round_robin",
    "slmserve.routing.least_load",
    "slmserve.routing.cache_aware",
    "slmserve.routing.d2lpm",
)
"""Modules registered as plugins before any third-party one, through the same hooks."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Entry(Generic[F]):
    """One registered factory and where it came from."""

    name: str
    factory: F
    plugin: str
    distribution: str
    version: str
    description: str


class Registry(Generic[F]):
    """Name -> factory table for one kind of extension (schedulers, compressors, backends,
    routers)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}
        self._source: tuple[str, str, str] = ("<direct>", "", "")

    def add(self, name: str, factory: F, *, description: str = "") -> None:
        """Register ``factory`` under ``name``; a duplicate name is an error naming both."""
        if not name or not isinstance(name, str):
            raise PluginError(f"{self.kind} name must be a non-empty string, got {name!r}")
        plugin, dist, version = self._source
        if name in self._entries:
            other = self._entries[name]
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {other.plugin!r} "
                f"and by plugin {plugin!r}"
            )
        if not description:
            doc = (getattr(factory, "__doc__", None) or "").strip()
            description = doc.splitlines()[0] if doc else ""
        self._entries[name] = Entry(name, factory, plugin, dist, version, description)

    def get(self, name: str) -> F:
        """Return the factory for ``name`` or raise an error listing the valid names."""
        try:
            return self._entries[name].factory
        except KeyError:
            valid = ", ".join(sorted(self._entries)) or "(none)"
            raise PluginError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[F]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class PluginManager:
    """Registers built-ins and entry-point plugins, then builds the registries once."""

    def __init__(
        self,
        *,
        load_entrypoints: bool | None = None,
        extra_plugins: tuple[Any, ...] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        for name in _env_list("SLMSERVE_DISABLE_PLUGINS"):
            self.pm.set_blocked(name)
        if os.environ.get("SLMSERVE_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(lambda msg: log.warning("plugin trace: %s", msg.rstrip()))
            self.pm.enable_tracing()
        for module_name in BUILTIN_PLUGINS:
            if not self.pm.is_blocked(module_name):
                self.pm.register(importlib.import_module(module_name), name=module_name)
        if load_entrypoints is None:
            load_entrypoints = not os.environ.get("SLMSERVE_DISABLE_PLUGIN_AUTOLOAD")
        if load_entrypoints:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin in extra_plugins:
            name = getattr(plugin, "__name__", None) or type(plugin).__qualname__
            self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self.schedulers: Registry[Callable[..., Any]] = self._collect(
            "scheduler", "slmserve_register_schedulers"
        )
        self.compressors: Registry[Callable[..., Any]] = self._collect(
            "compressor", "slmserve_register_compressors"
        )
        self.backends: Registry[Callable[..., Any]] = self._collect(
            "backend", "slmserve_register_backends"
        )
        self.routers: Registry[Callable[..., Any]] = self._collect(
            "router", "slmserve_register_routers"
        )

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def _dist_of(self) -> dict[int, tuple[str, str]]:
        found = {
            id(plugin): (dist.metadata["name"], dist.version)
            for plugin, dist in self.pm.list_plugin_distinfo()
        }
        try:
            own = ("slmserve", metadata.version("slmserve"))
        except metadata.PackageNotFoundError:
            own = ("slmserve", "unknown")
        for name, plugin in self.pm.list_name_plugin():
            if name in BUILTIN_PLUGINS:
                found[id(plugin)] = own
        return found

    def _collect(self, kind: str, hook_name: str) -> Registry[Callable[..., Any]]:
        """Call ``hook_name`` plugin by plugin so each entry records who registered it."""
        registry: Registry[Callable[..., Any]] = Registry(kind)
        dists = self._dist_of()
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()  # in call order reversed: first registered first
        plugins = [impl.plugin for impl in impls]
        for impl in impls:
            others = [p for p in plugins if p is not impl.plugin]
            dist, version = dists.get(id(impl.plugin), ("", ""))
            registry._source = (impl.plugin_name, dist, version)
            self.pm.subset_hook_caller(hook_name, remove_plugins=others)(registry=registry)
        registry._source = ("<direct>", "", "")
        return registry

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]


def _env_list(var: str) -> list[str]:
    return [x.strip() for x in os.environ.get(var, "").split(",") if x.strip()]
