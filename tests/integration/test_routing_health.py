"""The router's health rounds against fake replicas: a replica that refuses or fails its check
leaves the rotation; one that only answers late leaves it unless no replica answered in time."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from slmserve.routing.proxy import Keyer, Proxy, ProxyConfig
from slmserve.routing.round_robin import RoundRobin


async def _replica(behaviour: str) -> TestServer:
    async def health(_: web.Request) -> web.Response:
        if behaviour == "slow":
            await asyncio.sleep(1.0)
        return web.json_response({}, status=503 if behaviour == "failing" else 200)

    app = web.Application()
    app.router.add_get("/health", health)
    server = TestServer(app)
    await server.start_server()
    return server


async def _live_after_a_round(behaviours: list[str]) -> list[str]:
    servers = [await _replica(b) for b in behaviours]
    urls = [str(s.make_url("")) for s in servers]
    proxy = Proxy(RoundRobin(), urls, ProxyConfig(health_timeout=0.2), Keyer("text"))
    proxy.session = aiohttp.ClientSession()
    try:
        for url in proxy.urls:
            proxy.router.mark_up(url)
        await proxy.check_health()
        return [behaviours[proxy.urls.index(u)] for u in proxy.router.live_replicas()]
    finally:
        await proxy.session.close()
        for s in servers:
            await s.close()


async def test_a_slow_replica_leaves_only_while_another_answers() -> None:
    assert await _live_after_a_round(["ok", "slow"]) == ["ok"]
    assert await _live_after_a_round(["slow", "slow"]) == ["slow", "slow"]


async def test_a_failing_replica_leaves_even_when_it_is_the_last() -> None:
    assert await _live_after_a_round(["failing"]) == []
    assert await _live_after_a_round(["failing", "slow"]) == ["slow"]
