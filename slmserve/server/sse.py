"""Server-Sent Events, the way OpenAI streams: ``data: <json>\\n\\n`` ... ``data: [DONE]\\n\\n``."""

from __future__ import annotations

from aiohttp import web

DONE = b"data: [DONE]\n\n"

DISCONNECTED = (ConnectionError,)
"""What a write raises once the client has gone (aiohttp's ``ClientConnectionResetError`` is a
``ConnectionResetError``)."""


async def open_stream(request: web.Request) -> web.StreamResponse:
    """Send the SSE headers; proxies are asked not to buffer."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


async def send(response: web.StreamResponse, payload: bytes) -> None:
    """One event; ``payload`` is already-encoded JSON."""
    await response.write(b"data: " + payload + b"\n\n")


async def close(response: web.StreamResponse) -> None:
    await response.write(DONE)
    await response.write_eof()
