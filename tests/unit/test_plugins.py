"""Plugin manager: built-ins through the hooks, entry points, clear errors."""

from __future__ import annotations

import inspect
import logging
import re
import textwrap
from pathlib import Path

import pluggy
import pytest

from slmserve import PluginError, Scheduler, hookimpl, hookspecs
from slmserve.plugins import BUILTIN_PLUGINS, PluginManager, Registry

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


class _Dummy(Scheduler):
    name = "dummy"

    def order(self, waiting, now):  # type: ignore[no-untyped-def]
        return list(waiting)


class DummyPlugin:
    @hookimpl
    def slmserve_register_schedulers(self, registry: Registry) -> None:
        registry.add("dummy", _Dummy, description="does nothing")


def test_builtins_registered_through_hooks() -> None:
    pm = PluginManager(load_entrypoints=False)
    assert "fcfs" in pm.schedulers
    assert "native" in pm.backends
    fcfs = next(e for e in pm.schedulers.entries() if e.name == "fcfs")
    assert fcfs.plugin == "slmserve.schedulers.fcfs"
    assert fcfs.distribution == "slmserve"
    assert set(BUILTIN_PLUGINS) <= set(pm.plugin_names())


def test_unknown_name_lists_valid_names() -> None:
    pm = PluginManager(load_entrypoints=False)
    with pytest.raises(PluginError, match=r"unknown scheduler 'nope'; valid names: .*fcfs"):
        pm.schedulers.get("nope")


def test_duplicate_name_names_both_plugins() -> None:
    class Clash:
        @hookimpl
        def slmserve_register_schedulers(self, registry: Registry) -> None:
            registry.add("fcfs", _Dummy)

    with pytest.raises(PluginError) as info:
        PluginManager(load_entrypoints=False, extra_plugins=(Clash(),))
    message = str(info.value)
    assert "slmserve.schedulers.fcfs" in message
    assert "Clash" in message or "clash" in message.lower()


def test_extra_plugin_registered_and_resolvable() -> None:
    pm = PluginManager(load_entrypoints=False, extra_plugins=(DummyPlugin(),))
    assert pm.schedulers.get("dummy") is _Dummy
    entry = next(e for e in pm.schedulers.entries() if e.name == "dummy")
    assert entry.description == "does nothing"


def test_misspelled_hook_is_an_error() -> None:
    class Typo:
        @hookimpl
        def slmserve_register_schedulerz(self, registry: Registry) -> None: ...

    with pytest.raises(pluggy.PluginValidationError):
        PluginManager(load_entrypoints=False, extra_plugins=(Typo(),))


def _fake_distribution(tmp_path: Path) -> None:
    pkg = tmp_path / "fakeplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from slmserve import Scheduler, hookimpl

            class Fake(Scheduler):
                name = "fake"
                def order(self, waiting, now):
                    return list(waiting)

            @hookimpl
            def slmserve_register_schedulers(registry):
                registry.add("fake", Fake)
            """
        )
    )
    info = tmp_path / "fakeplug-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[slmserve]\nfake = fakeplug\n")


def test_entry_point_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SLMSERVE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pm = PluginManager()
    entry = next(e for e in pm.schedulers.entries() if e.name == "fake")
    assert (entry.plugin, entry.distribution, entry.version) == ("fake", "fakeplug", "0.3")


def test_autoload_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SLMSERVE_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "fake" not in PluginManager().schedulers


def test_blocking_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMSERVE_DISABLE_PLUGINS", "slmserve.schedulers.fcfs")
    pm = PluginManager(load_entrypoints=False)
    assert "fcfs" not in pm.schedulers
    assert "native" in pm.backends


def test_trace_switch(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SLMSERVE_TRACE_PLUGINS", "1")
    with caplog.at_level(logging.WARNING, logger="slmserve.plugins"):
        PluginManager(load_entrypoints=False)
    assert any("slmserve_register_schedulers" in r.getMessage() for r in caplog.records)


def _hookspec_names() -> list[str]:
    return [
        n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("slmserve_")
    ]


@pytest.mark.parametrize("name", _hookspec_names())
def test_every_hook_is_documented_with_its_signature(name: str) -> None:
    pm = pluggy.PluginManager("slmserve")
    pm.add_hookspecs(hookspecs)
    args = getattr(pm.hook, name).spec.argnames
    pattern = re.escape(f"{name}({', '.join(args)})")
    assert re.search(pattern, DOCS.read_text()), f"{name}({', '.join(args)}) missing from {DOCS}"
