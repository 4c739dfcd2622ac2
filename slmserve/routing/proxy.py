"""``slmserve route``: an aiohttp reverse proxy that spreads requests over replicas.

It speaks the replicas' API (``/v1/completions``, ``/v1/chat/completions``, ``/v1/score``,
``/v1/models``, ``/tokenize``, ``/detokenize``) and has its own ``/health`` and ``/metrics``.
For each generation or scoring request it:

1. reads the body once, takes the client id as the server does (``X-Client-Id`` over ``user``)
   and builds the routing key (:class:`Keyer`): the prompt as text blocks, or as token ids
   from a local tokenizer (``--model``) or from a replica's ``/tokenize``;
2. asks the :class:`~slmserve.routing.base.Router` for a live replica and forwards the body;
3. if the replica cannot be reached, or drops the connection before any response byte, the
   attempt is undone (``Outcome(ok=False)``), the replica leaves the rotation and the request
   goes to another replica; it is never dropped silently: when no replica can take it, the
   client gets a 502/503 in the OpenAI error format;
4. relays the response: JSON whole, Server-Sent Events chunk by chunk as they arrive (no
   buffering). A replica that dies mid-stream cannot be retried (tokens were sent): the
   client gets an SSE error event and the stream ends;
5. tells the router the request finished, with the usage the replica reported.

A background task polls every replica's ``/health``: replicas come back into rotation when
they answer 200, and leave it when they do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from slmserve.routing.base import NoReplicaError, Outcome, Router, RouteRequest
from slmserve.routing.tree import text_key
from slmserve.server.errors import APIError, error_body, error_middleware
from slmserve.types import DEFAULT_CLIENT

log = logging.getLogger("slmserve.router")

CLIENT_ID_HEADER = "X-Client-Id"
PREFIX = "slmserve_router:"
MAX_CLIENTS_PER_SERIES = 100
FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept")
RETRYABLE = (
    aiohttp.ClientConnectorError,  # refused, unreachable: nothing was sent
    aiohttp.ServerDisconnectedError,  # closed before any response byte
    aiohttp.ClientOSError,  # reset before any response byte
)
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    route_on: str = "text"
    """``text`` (blocks of characters, no tokenizer) or ``tokens``."""
    health_interval: float = 2.0
    health_timeout: float = 2.0
    connect_timeout: float = 5.0


# ---------------------------------------------------------------------------- routing keys


class Keyer:
    """Turns a request body into a routing key: text blocks, or token ids.

    With ``route_on="tokens"`` a local tokenizer (``--model``) is used when given, otherwise the
    replica's ``/tokenize`` (one extra round trip per request; the chat template is the
    replica's own). Token-id prompts are used as they are in both modes.
    """

    def __init__(self, route_on: str, tokenizer: Any = None) -> None:
        if route_on not in ("text", "tokens"):
            raise ValueError(f"route_on must be 'text' or 'tokens', got {route_on!r}")
        self.route_on = route_on
        self.tokenizer = tokenizer

    async def key(self, path: str, body: dict[str, Any], proxy: Proxy) -> np.ndarray:
        prompt: Any
        messages = None
        if path.endswith("/chat/completions"):
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "`messages` must be a non-empty list", param="messages")
            prompt = _chat_text(messages)
        elif path.endswith("/score"):
            prompt = body.get("query")
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
                prompt = prompt[0]  # a batch goes to one replica: route on its first prompt
        if isinstance(prompt, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise APIError(400, "a token-id prompt must be a list of integers", param="prompt")
            return np.asarray(prompt, np.int64)
        if not isinstance(prompt, str):
            raise APIError(400, "the request has no prompt to route on", param="prompt")
        if self.route_on == "text":
            return text_key(prompt)
        if self.tokenizer is not None:
            if messages is not None:
                ids = self.tokenizer.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=True
                )
            else:
                ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            return np.asarray(ids, np.int64)
        payload = {"messages": messages} if messages is not None else {"prompt": prompt}
        return np.asarray(await proxy.remote_tokenize(payload), np.int64)


def _chat_text(messages: list[Any]) -> str:
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            raise APIError(400, "every message must be an object", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{m.get('role', '')}>{content or ''}\n")
    return "".join(parts)


# ---------------------------------------------------------------------------- metrics


class ProxyStats:
    """Counters the proxy keeps; exported at scrape time by :class:`RouterCollector`."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        """(replica, outcome) -> attempts: ``ok``, ``error`` (replica answered >= 400),
        ``unreachable`` or ``unavailable`` (503; retried elsewhere), ``broken`` (died
        mid-response)."""
        self.prompt_tokens: defaultdict[str, int] = defaultdict(int)
        self.cached_tokens: defaultdict[str, int] = defaultdict(int)
        self.client_requests: defaultdict[str, int] = defaultdict(int)
        self.client_service: defaultdict[str, float] = defaultdict(float)
        self.rejected: defaultdict[str, int] = defaultdict(int)
        """Requests the proxy answered itself with an error, by reason."""

    def usage(self, replica: str, client: str, usage: dict[str, Any]) -> Outcome:
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = usage.get("cached_tokens")
        details = usage.get("prompt_tokens_details")
        if cached is None and isinstance(details, dict):
            cached = details.get("cached_tokens")
        cached = int(cached or 0)
        output = int(usage.get("completion_tokens") or 0)
        self.prompt_tokens[replica] += prompt
        self.cached_tokens[replica] += cached
        self.client_service[client] += (prompt - cached) + 2 * output
        return Outcome(prompt_tokens=prompt, cached_tokens=cached, output_tokens=output)


class RouterCollector(Collector):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        router, stats = self.proxy.router, self.proxy.stats

        def family(kind: type, name: str, doc: str, labels: list[str]) -> Any:
            return kind(PREFIX + name, doc, labels=labels)

        up = family(
            GaugeMetricFamily, "replica_up", "1 if the replica is in rotation.", ["replica"]
        )
        load = family(GaugeMetricFamily, "replica_load", "Requests in flight.", ["replica"])
        routed = family(CounterMetricFamily, "replica_routed", "Requests routed.", ["replica"])
        hit = family(
            GaugeMetricFamily,
            "replica_prefix_cache_hit_rate",
            "Cached prompt tokens / prompt tokens, from the replicas' usage reports.",
            ["replica"],
        )
        for r in router.replicas:
            up.add_metric([r], float(r in router.live))
            load.add_metric([r], float(router.load[r]))
            routed.add_metric([r], float(router.routed[r]))
            prompt = stats.prompt_tokens[r]
            hit.add_metric([r], stats.cached_tokens[r] / prompt if prompt else 0.0)
        yield from (up, load, routed, hit)
        attempts = family(
            CounterMetricFamily,
            "attempts",
            "Forwarding attempts by outcome.",
            ["replica", "outcome"],
        )
        for (r, outcome), n in sorted(stats.requests.items()):
            attempts.add_metric([r, outcome], float(n))
        yield attempts
        rejected = family(
            CounterMetricFamily, "rejected", "Requests answered with a router error.", ["reason"]
        )
        for reason, n in sorted(stats.rejected.items()):
            rejected.add_metric([reason], float(n))
        yield rejected
        top = sorted(stats.client_requests, key=stats.client_requests.__getitem__, reverse=True)
        top = top[:MAX_CLIENTS_PER_SERIES]
        reqs = family(CounterMetricFamily, "client_requests", "Requests per client.", ["client"])
        service = family(
            CounterMetricFamily,
            "client_service_tokens",
            "Service per client: (prompt - cached) + 2 x output tokens, from usage reports.",
            ["client"],
        )
        for c in top:
            reqs.add_metric([c], float(stats.client_requests[c]))
            service.add_metric([c], stats.client_service[c])
        yield from (reqs, service)
        for series, values in router.stats().items():
            fam = family(
                GaugeMetricFamily, f"policy_{series}", f"Policy counter {series!r}.", ["key"]
            )
            for k, v in values.items():
                fam.add_metric([str(k)], float(v))
            yield fam


# ---------------------------------------------------------------------------- the proxy


class Proxy:
    """The application's state: router, replica URLs, HTTP session, counters."""

    def __init__(
        self, router: Router, replicas: Sequence[str], config: ProxyConfig, keyer: Keyer
    ) -> None:
        if not replicas:
            raise ValueError("give at least one --replica URL")
        self.urls = [u.rstrip("/") for u in replicas]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"a replica is listed twice: {list(replicas)}")
        self.router = router
        router.set_replicas(self.urls)
        self.config = config
        self.keyer = keyer
        self.stats = ProxyStats()
        self.session: aiohttp.ClientSession | None = None
        self._ids = itertools.count()
        self._health_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout)
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())
        try:
            yield
        finally:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            await self.session.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            await self.check_health()

    async def check_health(self) -> None:
        """One health round. A replica that refuses the check or answers it with an error
        leaves the rotation; one that only answers too late (``health_timeout``) leaves it
        while another replica answered in time: the slow one is more likely saturated than
        dead, and taking out the last one would fail every request instead of slowing them."""
        results = await asyncio.gather(*(self._healthy(u) for u in self.urls))
        answered = any(ok is True for ok in results)
        for url, ok in zip(self.urls, results):
            if ok is True and url not in self.router.live:
                log.info("replica %s is healthy: back in rotation", url)
                self.router.mark_up(url)
            elif ok is False and url in self.router.live:
                log.warning("replica %s failed its health check: out of rotation", url)
                self.router.mark_down(url)
            elif ok is None and url in self.router.live:
                if answered:
                    log.warning("replica %s timed out its health check: out of rotation", url)
                    self.router.mark_down(url)
                else:
                    log.warning("replica %s timed out its health check: kept, no replica "
                                "answered in time", url)  # fmt: skip

    async def _healthy(self, url: str) -> bool | None:
        """True: healthy; False: refused or unhealthy; None: no answer within the timeout."""
        assert self.session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.health_timeout)
            async with self.session.get(f"{url}/health", timeout=timeout) as resp:
                return resp.status == 200
        except asyncio.TimeoutError:
            return None
        except (aiohttp.ClientError, OSError):
            return False

    # ------------------------------------------------------------------ helpers

    def _live_or_503(self) -> list[str]:
        live = self.router.live_replicas()
        if not live:
            self.stats.rejected["no_replica"] += 1
            raise APIError(503, "no replica is available; retry later", code="no_replica")
        return live

    async def remote_tokenize(self, payload: dict[str, Any]) -> list[int]:
        """Token ids from the first live replica that answers ``/tokenize``."""
        assert self.session is not None
        for url in self._live_or_503():
            try:
                async with self.session.post(f"{url}/tokenize", json=payload) as resp:
                    if resp.status == 200:
                        return list((await resp.json())["tokens"])
                    raise APIError(resp.status, f"tokenization failed: {await resp.text()}")
            except RETRYABLE:
                self.router.mark_down(url)
        self.stats.rejected["no_replica"] += 1
        raise APIError(503, "no replica could tokenize the request", code="no_replica")

    async def forward_plain(self, request: web.Request) -> web.Response:
        """GET/POST passed to the first live replica that answers (models, tokenize)."""
        assert self.session is not None
        body = await request.read()
        for url in self._live_or_503():
            try:
                async with self.session.request(
                    request.method,
                    url + request.rel_url.path_qs,
                    data=body or None,
                    headers=_forwarded(request, None),
                ) as resp:
                    data = await resp.read()
                    return web.Response(status=resp.status, body=data, headers=_reply(resp))
            except RETRYABLE:
                self.router.mark_down(url)
        self.stats.rejected["no_replica"] += 1
        raise APIError(503, "no replica is available; retry later", code="no_replica")

    # ------------------------------------------------------------------ routed requests

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        user = body.get("user")
        client = request.headers.get(CLIENT_ID_HEADER) or (user if isinstance(user, str) else None)
        client = client or DEFAULT_CLIENT
        self._live_or_503()
        key = await self.keyer.key(request.path, body, self)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            max_tokens = 0 if request.path.endswith("/score") else DEFAULT_MAX_TOKENS
        self.stats.client_requests[client] += 1
        rid = f"route-{next(self._ids)}"
        tried: list[str] = []
        while True:
            try:
                replica = self.router.route(
                    RouteRequest(f"{rid}.{len(tried)}", key, client, max_tokens), time.monotonic()
                )
            except NoReplicaError:
                reason = "all_replicas_failed" if tried else "no_replica"
                self.stats.rejected[reason] += 1
                raise APIError(
                    502 if tried else 503,
                    f"no replica could take the request (tried: {', '.join(tried) or 'none'})",
                    code=reason,
                ) from None
            attempt = f"{rid}.{len(tried)}"
            response = await self._attempt(request, raw, replica, attempt, client)
            if response is not None:
                return response
            tried.append(replica)

    async def _attempt(
        self, request: web.Request, raw: bytes, replica: str, attempt: str, client: str
    ) -> web.StreamResponse | None:
        """One forwarding attempt; ``None`` when the replica was never reached (retry)."""
        assert self.session is not None
        now = time.monotonic
        try:
            upstream = await self.session.post(
                replica + request.path, data=raw, headers=_forwarded(request, client)
            )
        except RETRYABLE as exc:
            log.warning("replica %s unreachable (%s): out of rotation, retrying", replica, exc)
            self.stats.requests[(replica, "unreachable")] += 1
            self.router.finish(attempt, now(), Outcome(ok=False))
            self.router.mark_down(replica)
            return None
        if upstream.status == 503:  # draining or dead engine: it did not take the request
            detail = (await upstream.read()).decode(errors="replace")[:200]
            upstream.release()
            log.warning("replica %s answered 503 (%s): out of rotation, retrying", replica, detail)
            self.stats.requests[(replica, "unavailable")] += 1
            self.router.finish(attempt, now(), Outcome(ok=False))
            self.router.mark_down(replica)
            return None
        outcome = Outcome(ok=upstream.status < 500)
        try:
            if upstream.content_type == "text/event-stream":
                response, outcome = await self._relay_stream(request, upstream, replica, client)
            else:
                data = await upstream.read()
                if upstream.status == 200:
                    usage = _usage(data)
                    if usage is not None:
                        outcome = self.stats.usage(replica, client, usage)
                response = web.Response(status=upstream.status, body=data, headers=_reply(upstream))
            status = "ok" if upstream.status < 400 else "error"
            self.stats.requests[(replica, status)] += 1
            return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.stats.requests[(replica, "broken")] += 1
            outcome = Outcome(ok=False)
            raise APIError(
                502, f"replica {replica} failed mid-response: {exc}", code="replica_failed"
            ) from None
        finally:
            upstream.release()
            self.router.finish(attempt, now(), outcome)

    async def _relay_stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, replica: str, client: str
    ) -> tuple[web.StreamResponse, Outcome]:
        """Relay Server-Sent Events as they come; watch for the usage chunk on the way."""
        response = web.StreamResponse(status=upstream.status, headers=_reply(upstream))
        await response.prepare(request)
        outcome = Outcome()
        tail = b""
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                tail = (tail + chunk)[-65536:]
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.stats.requests[(replica, "broken")] += 1
            error = APIError(
                502, f"replica {replica} failed mid-stream: {exc}", code="replica_failed"
            )
            with contextlib.suppress(ConnectionError):
                await response.write(b"data: " + error_body(error) + b"\n\n")
                await response.write_eof()
            return response, Outcome(ok=False)
        usage = _stream_usage(tail)
        if usage is not None:
            outcome = self.stats.usage(replica, client, usage)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response, outcome


def _forwarded(request: web.Request, client: str | None) -> dict[str, str]:
    headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
    if client is not None:
        headers[CLIENT_ID_HEADER] = client
    return headers


def _reply(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    keep = ("Content-Type", "Cache-Control", "X-Accel-Buffering")
    return {h: upstream.headers[h] for h in keep if h in upstream.headers}


def _usage(data: bytes) -> dict[str, Any] | None:
    try:
        usage = msgspec.json.decode(data).get("usage")
    except (msgspec.DecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _stream_usage(tail: bytes) -> dict[str, Any] | None:
    """The ``usage`` of the last SSE event that carries one (``stream_options.include_usage``)."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            return _usage(line[6:])
    return None


# ---------------------------------------------------------------------------- the app

PROXY = web.AppKey("proxy", Proxy)


def create_router_app(
    router: Router,
    replicas: Sequence[str],
    config: ProxyConfig | None = None,
    *,
    tokenizer: Any = None,
) -> web.Application:
    """The proxy application (pure factory: the CLI and the tests call it)."""
    config = config or ProxyConfig()
    proxy = Proxy(router, replicas, config, Keyer(config.route_on, tokenizer))
    app = web.Application(middlewares=[error_middleware])
    app[PROXY] = proxy
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RouterCollector(proxy))

    async def health(request: web.Request) -> web.Response:
        if not proxy.router.live:
            raise APIError(503, "no replica is in rotation", code="no_replica")
        live = len(proxy.router.live)
        return web.json_response({"status": "ok", "replicas_live": live})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/score"):
        app.router.add_post(path, proxy.handle)
    app.router.add_get("/v1/models", proxy.forward_plain)
    app.router.add_get("/v1/models/{model}", proxy.forward_plain)
    app.router.add_post("/tokenize", proxy.forward_plain)
    app.router.add_post("/detokenize", proxy.forward_plain)
    app.cleanup_ctx.append(proxy.start)
    return app
