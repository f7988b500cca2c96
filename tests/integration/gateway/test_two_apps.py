"""Two gateway apps over one real Redis: what each keeps in process stays exact across both.

- The in-process answer cache: a replica serves a token from memory, and the writer's
  announcement of new data reaches both replicas, which then answer the new sample.
- The batched per-minute counters: concurrent requests through both replicas are admitted
  exactly up to the limit, each with a count of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from api_gateway.app import create_app
from api_gateway.errors import RedisUnavailable
from api_gateway.local_cache import LocalCache
from api_gateway.metrics import GatewayMetrics
from api_gateway.ratelimit import HitBatcher
from api_gateway.redis_gate import RedisGate
from api_gateway.settings import GatewaySettings
from api_gateway.state import LOCAL_CACHE
from tests.integration.gateway.conftest import PEPPER, create_key, gateway_settings
from tests.integration.gateway.helpers import free_port, minute_with_room
from tokvel_common.apikeys import hash_key, rate_limit_key, rate_limit_window
from tokvel_common.cache import TokenSnapshot, decode_value, snapshot_entries, token_key
from tokvel_common.invalidation import Invalidation, publish

pytestmark = pytest.mark.integration

T = TypeVar("T")


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def two_apps(
    settings: GatewaySettings, local_caches: list[LocalCache] | None = None
) -> AsyncIterator[list[tuple[web.Application, str]]]:
    """Two apps served on loopback; ``local_caches`` replace their in-process answer caches."""
    async with AsyncExitStack() as stack:
        served = []
        for n in range(2):
            app = create_app(settings)
            if local_caches:
                app[LOCAL_CACHE] = local_caches[n]
            server = TestServer(app, host="127.0.0.1", port=0)
            await server.start_server()
            stack.push_async_callback(server.close)
            served.append((app, str(server.make_url("")).rstrip("/")))
        yield served


async def _token(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(base + "/v1/tokens/1") as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def test_new_data_announced_by_the_writer_reaches_both_replicas_at_once(
    db_url: str, redis_url: str
) -> None:
    key = await create_key(db_url, "enterprise")
    settings = gateway_settings(db_url, redis_url)
    # Entries that never expire: whatever drops one here is an announcement, not its TTL.
    caches = [LocalCache(5.0, clock=lambda: 0.0) for _ in range(2)]
    redis = Redis.from_url(redis_url)
    async with (
        two_apps(settings, caches) as apps,
        aiohttp.ClientSession(headers={"X-API-Key": key}) as session,
    ):

        async def subscribed() -> bool:
            return all(cache.enabled for cache in caches)

        await until(subscribed, "both replicas to subscribe to the announcements")
        first = await _token(session, apps[0][1])  # a miss: PostgreSQL, then Redis is filled
        assert first["meta"]["source"] == "database"
        price = first["data"]["metrics"]["price_usd"]

        async def kept() -> bool:
            for _, base in apps:
                assert (await _token(session, base))["meta"]["source"] == "cache"
            return all(cache.get("token", 1) is not None for cache in caches)

        await until(kept, "both replicas to keep the token in memory")

        # The writer's order: the new sample's keys first, then the announcement.
        raw = await redis.get(token_key(1))
        assert raw is not None
        old = decode_value(raw, TokenSnapshot)
        new = old.model_copy(
            update={"metrics": old.metrics.model_copy(update={"price_usd": price * 2})}
        )
        pipe = redis.pipeline(transaction=False)
        for cache_key, value, ttl in snapshot_entries(new):
            pipe.set(cache_key, value, ex=ttl)
        await pipe.execute()
        for _, base in apps:  # not announced yet: answered from memory, Redis not asked
            assert (await _token(session, base))["data"]["metrics"]["price_usd"] == price

        await publish(redis, Invalidation(kind="metrics", cmc_ids=[1]))

        async def both_new() -> bool:
            answers = [await _token(session, base) for _, base in apps]
            return all(a["data"]["metrics"]["price_usd"] == price * 2 for a in answers)

        await until(both_new, "both replicas to answer the new sample")
        assert all(cache.get("token", 1) is not None for cache in caches)  # kept again
    await redis.aclose()


async def test_concurrent_requests_through_both_replicas_are_admitted_exactly(
    db_url: str, redis_url: str
) -> None:
    limit, requests = 50, 120
    tiers = {"basic": {"per_minute": 60, "per_month": 1000}, "burst": {
        "per_minute": limit, "per_month": 1_000_000
    }}  # fmt: skip
    key = await create_key(db_url, "burst")
    settings = gateway_settings(db_url, redis_url, api_tiers=tiers)
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        two_apps(settings) as apps,
        aiohttp.ClientSession(headers={"X-API-Key": key}, connector=connector) as session,
    ):
        for _, base in apps:  # the key and the token are known to both before the burst
            async with session.get(base + "/v1/usage") as response:
                assert response.status == 200

        async def one(n: int) -> tuple[int, int]:
            async with session.get(apps[n % 2][1] + "/v1/tokens/1") as response:
                await response.read()
                return response.status, int(response.headers["X-RateLimit-Remaining"])

        await minute_with_room(30)
        answers = await asyncio.gather(*(one(n) for n in range(requests)))
        window = rate_limit_window(time.time())
    admitted = sorted(remaining for status, remaining in answers if status == 200)
    refused = [remaining for status, remaining in answers if status == 429]
    assert admitted == list(range(limit)), "each admitted request has a count of its own"
    assert len(refused) == requests - limit and set(refused) == {0}
    redis = Redis.from_url(redis_url)
    try:
        counter = rate_limit_key(hash_key(key, PEPPER), window)
        assert int(await redis.get(counter) or 0) == requests  # refused ones count too
        assert 0 < await redis.ttl(counter) <= 3600
    finally:
        await redis.aclose()


class CountingGate(RedisGate):
    """The real gate, counting the round trips it makes."""

    def __init__(self, url: str) -> None:
        client = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        super().__init__(client, GatewayMetrics(CollectorRegistry()), retry_seconds=1.0)
        self.round_trips = 0

    async def run(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        self.round_trips += 1
        return await super().run(operation, call)


async def test_one_turn_of_hits_is_counted_as_consecutive_increments(redis_url: str) -> None:
    gate = CountingGate(redis_url)
    batcher = HitBatcher(gate)
    try:
        counts = await asyncio.gather(
            *(batcher.hit("rate_limit:a:1") for _ in range(30)),
            *(batcher.hit("rate_limit:b:1") for _ in range(7)),
        )
        assert sorted(counts[:30]) == list(range(1, 31))
        assert sorted(counts[30:]) == list(range(1, 8))
        assert gate.round_trips == 1  # both counters in one pipeline
        assert sorted(await asyncio.gather(*(batcher.hit("rate_limit:b:1") for _ in range(5)))) == [
            8, 9, 10, 11, 12
        ]  # fmt: skip
        assert gate.round_trips == 2
        assert await batcher.hit("rate_limit:b:1") == 13  # alone in its turn
        assert await gate.client.get("rate_limit:a:1") == b"30"
        assert 3590 <= await gate.client.ttl("rate_limit:b:1") <= 3600
    finally:
        await gate.client.aclose()


async def test_a_batch_that_cannot_be_counted_fails_every_request_in_it() -> None:
    gate = CountingGate(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    batcher = HitBatcher(gate)
    try:
        results = await asyncio.gather(
            *(batcher.hit("rate_limit:a:1") for _ in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, RedisUnavailable) for r in results), results
        assert gate.round_trips == 1
    finally:
        await gate.client.aclose()
