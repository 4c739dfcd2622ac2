"""API-key check: ``Authorization: Bearer <key>``, compared in constant time.

Probes and scrapers (``/health``, ``/ready``, ``/metrics``) stay open: orchestrators and
Prometheus rarely carry credentials, and those routes reveal nothing about prompts.
"""

from __future__ import annotations

import hmac

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from slmserve.server.errors import APIError

OPEN_ROUTES = frozenset({"health", "ready", "metrics"})
"""Route names (not paths, so it also holds when the app is mounted under a prefix)."""


def api_key_middleware(api_key: str) -> Middleware:
    """A middleware that rejects requests without the right bearer token (401)."""
    expected = api_key.encode()

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.route.name not in OPEN_ROUTES:
            scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), expected
            ):
                raise APIError(
                    401,
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
        return await handler(request)

    return check_api_key
