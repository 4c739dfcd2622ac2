"""One middleware that turns every failure into the OpenAI error body, with the right status.

Handlers raise; they never build error responses themselves. That keeps the mapping in one
table (below) and guarantees a bad request never surfaces as a 500 or a traceback:

=====================================  ======  ==========================
failure                                status  ``type`` / ``code``
=====================================  ======  ==========================
malformed JSON, invalid field           400    invalid_request_error
prompt + max_tokens over the context    400    ... / context_length_exceeded
missing or wrong API key                401    authentication_error / invalid_api_key
unknown route / unknown model           404    not_found_error / model_not_found
wrong method                            405    invalid_request_error / method_not_allowed
body over ``max_body_bytes``            413    invalid_request_error / request_too_large
waiting queue full                      429    rate_limit_error / queue_full
engine stopped or shutting down         503    service_unavailable / shutting_down
anything else (a bug)                   500    internal_error (logged; no traceback sent)
=====================================  ======  ==========================
"""

from __future__ import annotations

import logging
import re

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from slmserve.engine import EngineClosedError, QueueFullError
from slmserve.server.protocol import ENCODER, ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
_CODE_BY_STATUS = {
    405: "method_not_allowed",
    413: "request_too_large",
}
_FIELD_PATH = re.compile(r" - at `\$\.?(.*)`$")


class APIError(Exception):
    """An expected failure with an HTTP status; the middleware renders it as the OpenAI body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "internal_error")


def error_body(error: APIError) -> bytes:
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    return ENCODER.encode(ErrorResponse(error=detail))


def error_response(error: APIError) -> web.Response:
    return web.Response(
        status=error.status, body=error_body(error), content_type="application/json"
    )


def from_exception(exc: BaseException) -> APIError:
    """Map any exception to the :class:`APIError` the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        match = _FIELD_PATH.search(text)
        return APIError(400, f"invalid request: {text}", param=match and (match.group(1) or None))
    if isinstance(exc, msgspec.DecodeError):
        return APIError(400, f"request body is not valid JSON: {exc}")
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is overloaded: {exc}", code="queue_full")
    if isinstance(exc, EngineClosedError):
        return APIError(503, "the server is shutting down; retry elsewhere", code="shutting_down")
    if isinstance(exc, web.HTTPException):
        status = exc.status
        message = exc.text or exc.reason
        if status == 404:
            message = "not found: no route matches this method and path"
        return APIError(status, message, code=_CODE_BY_STATUS.get(status))
    return APIError(500, "internal server error (the server log has the details)")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: every exception becomes a JSON error response."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and friends pass through untouched
            raise
        return error_response(from_exception(exc))
    except Exception as exc:
        error = from_exception(exc)
        if error.status >= 500 and not isinstance(exc, APIError | EngineClosedError):
            log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(error)
