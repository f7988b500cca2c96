"""Slowloris: many connections dribbling a request's headers, one line a second, never ending
them. Meanwhile a normal client keeps making requests (REST) or opening subscriptions
(WebSocket): each must be served within a bound. At full scale the slow connections are kept
going until the server drops them: aiohttp's keep-alive timer (75 s under ``web.run_app``)
also runs from the moment a connection opens, so a request that never completes its headers
holds its socket at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
import orjson
import pytest

from tests.abuse.conftest import FULL, Figures, Scale
from tests.abuse.stack import AbuseStack, Service
from tests.abuse.support import PEER_GONE, format_ms, open_websocket

pytestmark = pytest.mark.abuse

DRIBBLE_SECONDS: Final = 1.0
NORMAL_BOUND_SECONDS: Final = 1.0
KEEPALIVE_TIMEOUT_SECONDS: Final = 75.0  # aiohttp's web.run_app default, which both services use
DROP_SLACK_SECONDS: Final = 15.0
CONNECT_CONCURRENCY: Final = 100


class SlowClient:
    """One connection sending a request line, then a header line a second, forever."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.opened = asyncio.Event()
        self.opened_at = 0.0
        self.dropped_after: float | None = None

    async def run(self, admitted: asyncio.Semaphore) -> None:
        host, port = self.service.base_url.removeprefix("http://").split(":")
        async with admitted:
            reader, writer = await asyncio.open_connection(host, int(port))
        self.opened_at = time.monotonic()
        self.opened.set()
        try:
            writer.write(b"GET /v1/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while True:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1024), DRIBBLE_SECONDS) == b"":
                        break  # the server closed it
        except PEER_GONE:
            pass
        finally:
            self.dropped_after = time.monotonic() - self.opened_at
            writer.close()


async def _latencies(call: Callable[[], Awaitable[bool]], seconds: float) -> list[float]:
    """Call ``call`` back to back for ``seconds``; each call's time (it must succeed)."""
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        assert await call()
        times.append(time.perf_counter() - started)
    return times


async def _attack(
    service: Service,
    normal: Callable[[], Awaitable[bool]],
    scale: Scale,
    figures: Figures,
    label: str,
) -> None:
    admitted = asyncio.Semaphore(CONNECT_CONCURRENCY)
    clients = [SlowClient(service) for _ in range(scale.slow_clients)]
    tasks = [asyncio.create_task(client.run(admitted)) for client in clients]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(client.opened.wait() for client in clients))
        times = sorted(await _latencies(normal, scale.slow_seconds))
        still_open = sum(c.dropped_after is None for c in clients)
        if FULL:
            # Until the server drops them all (they would dribble forever).
            async with asyncio.timeout(KEEPALIVE_TIMEOUT_SECONDS + DROP_SLACK_SECONDS):
                await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    slowest = times[-1]
    p99 = times[max(0, int(len(times) * 0.99) - 1)]
    figures.add(
        f"{label}: normal calls during {len(clients)} slowloris connections",
        f"{len(times)} served, p99 {format_ms(p99)}, max {format_ms(slowest)}",
        f"all, max <= {format_ms(NORMAL_BOUND_SECONDS)}",
        slowest <= NORMAL_BOUND_SECONDS,
    )
    assert still_open == len(clients), "slow connections were dropped before the measurement"
    assert slowest <= NORMAL_BOUND_SECONDS, times[-10:]
    if FULL:
        lifetimes = [c.dropped_after for c in clients if c.dropped_after is not None]
        longest = max(lifetimes)
        bound = KEEPALIVE_TIMEOUT_SECONDS + DROP_SLACK_SECONDS
        figures.add(
            f"{label}: slowloris connections dropped by the server",
            f"{len(lifetimes)}/{len(clients)}, the last after {longest:.1f} s",
            f"all, within {bound:g} s",
            len(lifetimes) == len(clients) and longest <= bound,
        )


@pytest.mark.timeout(300)
async def test_slow_clients_do_not_starve_rest_clients(
    stack: AbuseStack, scale: Scale, figures: Figures
) -> None:
    key = await stack.new_key()
    async with aiohttp.ClientSession() as session:

        async def normal() -> bool:
            url = stack.gateway.base_url + "/v1/tokens/1"
            async with session.get(url, headers={"X-API-Key": key}) as response:
                await response.read()
                return response.status == 200

        await _attack(stack.gateway, normal, scale, figures, "gateway")


@pytest.mark.timeout(300)
async def test_slow_clients_do_not_starve_websocket_clients(
    stack: AbuseStack, scale: Scale, figures: Figures
) -> None:
    key = await stack.new_key()

    async def normal() -> bool:
        status, ws = await open_websocket(stack.ws_url, key)
        try:
            await ws.send_text(b'{"op": "subscribe", "token_ids": [1]}')
            answer = orjson.loads(await ws.receive_text())
            return status == 101 and answer["op"] == "subscribed"
        finally:
            ws.abort()

    await _attack(stack.ws, normal, scale, figures, "broadcaster")
