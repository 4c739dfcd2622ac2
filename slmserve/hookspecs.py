"""The whole extension surface of slmserve, as pluggy hook specifications.

A plugin is a module or object with functions decorated by ``@slmserve.hookimpl`` whose names
match the specs below. Third-party packages expose one through the ``slmserve`` entry-point
group::

    [project.entry-points.slmserve]
    my_plugin = "my_package.plugin"

The built-in schedulers, compressors and backends are registered through these same hooks.

Rules that keep the surface predictable:

* Registration hooks are synchronous and are called once, when a ``PluginManager`` is built.
  Names are resolved once at start-up; no hook is called on the per-step or per-token path.
* Lifecycle hooks may be ``async def``: the caller awaits any awaitable they return.
* No hook is ``firstresult``: every implementation is called, most recently registered first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from slmserve.plugins import Registry

PROJECT_NAME = "slmserve"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------------------------
# Registration hooks: called once per PluginManager, in registration order of the plugins.
# --------------------------------------------------------------------------------------------


@hookspec
def slmserve_register_schedulers(registry: Registry) -> None:
    """Register scheduler factories.

    :param registry: call ``registry.add(name, factory, description=...)`` once per scheduler;
        ``factory(**options)`` returns a :class:`slmserve.interfaces.Scheduler`. A name that
        another plugin already registered raises :class:`~slmserve.interfaces.PluginError`
        naming both plugins.
    """


@hookspec
def slmserve_register_compressors(registry: Registry) -> None:
    """Register context-compressor factories.

    :param registry: ``registry.add(name, factory, description=...)``; ``factory(**options)``
        returns a :class:`slmserve.interfaces.Compressor`.
    """


@hookspec
def slmserve_register_backends(registry: Registry) -> None:
    """Register model-backend factories.

    :param registry: ``registry.add(name, factory, description=...)``;
        ``factory(model_path, *, device, dtype, **options)`` returns a
        :class:`slmserve.interfaces.ModelBackend`. Import heavy dependencies (torch, kernels)
        inside the factory, not at module import time.
    """


@hookspec
def slmserve_register_routers(registry: Registry) -> None:
    """Register multi-replica routing policies (``slmserve route --policy``, the simulator).

    :param registry: ``registry.add(name, factory, description=...)``; ``factory(**options)``
        returns a :class:`slmserve.routing.base.Router`. Options come from ``--policy-opt
        KEY=VALUE``; an unknown or ill-typed option must raise ``TypeError``/``ValueError``.
    """


# --------------------------------------------------------------------------------------------
# Lifecycle hooks: called by the engine and by the server. May return awaitables.
# --------------------------------------------------------------------------------------------


@hookspec
def slmserve_startup(engine: Any) -> Any:
    """The engine has loaded its model and started its step loop.

    :param engine: the :class:`slmserve.engine.AsyncEngine`. Good for warming caches or
        starting background tasks. May be ``async def``.
    """


@hookspec
def slmserve_shutdown(engine: Any) -> Any:
    """The engine is stopping (after in-flight requests finished or were aborted).

    :param engine: the :class:`slmserve.engine.AsyncEngine`. May be ``async def``.
    """


@hookspec
def slmserve_request_finished(engine: Any, request_id: str, info: dict[str, Any]) -> None:
    """A request left the engine (finished, aborted or failed).

    Called on the event loop once per request, so keep it cheap (count, log, sample).

    :param engine: the engine.
    :param request_id: the request's id.
    :param info: ``finish_reason``, ``client_id``, ``prompt_tokens``, ``cached_tokens``,
        ``output_tokens``, ``arrival_time``, ``first_scheduled_time``, ``first_token_time``,
        ``finish_time`` (``time.monotonic()`` values; the middle two are ``None`` if never
        reached).
    """


# --------------------------------------------------------------------------------------------
# Server hooks: called once when the aiohttp application is built.
# --------------------------------------------------------------------------------------------


@hookspec
def slmserve_add_routes(app: web.Application, engine: Any) -> None:
    """Add routes, middlewares or cleanup contexts to the HTTP application.

    :param app: the aiohttp application, before it starts (its router is still mutable).
    :param engine: the engine the application serves.
    """
