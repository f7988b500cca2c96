"""Per-minute limits in Redis and the monthly quota in PostgreSQL, with their headers."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from redis.asyncio import Redis

from tests.integration.gateway.conftest import (
    PEPPER,
    Api,
    create_key,
    gateway_settings,
    serve,
)
from tests.integration.gateway.helpers import minute_with_room
from tokvel_common.apikeys import hash_key, rate_limit_key, rate_limit_window

pytestmark = pytest.mark.integration

TINY_TIERS = {
    "basic": {"per_minute": 60, "per_month": 1000},
    "tiny": {"per_minute": 100, "per_month": 5},
}


async def test_the_60th_request_passes_and_the_61st_is_429(api: Api, redis_url: str) -> None:
    key = await api.new_key("basic")
    await minute_with_room()
    for n in range(1, 61):
        response = await api.get("/v1/tokens/1", key=key)
        assert response.status == 200, n
        assert response.headers["X-RateLimit-Limit"] == "60"
        assert response.headers["X-RateLimit-Remaining"] == str(60 - n)
    refused = await api.get("/v1/tokens/1", key=key)
    assert refused.status == 429
    body = await refused.json()
    assert body["error"]["code"] == "rate_limited"
    headers = refused.headers
    assert headers["X-RateLimit-Limit"] == "60"
    assert headers["X-RateLimit-Remaining"] == "0"
    reset = int(headers["X-RateLimit-Reset"])
    assert 1 <= reset <= 60
    assert headers["Retry-After"] == str(reset)
    assert headers["RateLimit"].startswith(f'"minute";r=0;t={reset}, "month";r=940;')
    assert headers["RateLimit-Policy"].startswith('"minute";q=60;w=60, "month";q=1000;w=')

    usage = (await api.json("/v1/usage", key=key))["data"]
    assert usage["minute"] == {"limit": 60, "used": 61, "remaining": 0, "reset_s": reset}
    assert usage["month"]["used"] == 60

    redis = Redis.from_url(redis_url)
    try:
        counter = rate_limit_key(hash_key(key, PEPPER), rate_limit_window(time.time()))
        assert int(await redis.get(counter) or 0) == 61
        assert 0 < await redis.ttl(counter) <= 3600
    finally:
        await redis.aclose()


async def test_monthly_quota_is_durable_in_postgres(db_url: str, redis_url: str) -> None:
    key = await create_key(db_url, "tiny")
    settings = gateway_settings(db_url, redis_url, api_tiers=TINY_TIERS)
    async with serve(settings, key) as api:
        for _ in range(5):
            assert (await api.get("/v1/tokens/1")).status == 200
        refused = await api.get("/v1/tokens/1")
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "quota_exceeded"
        assert int(refused.headers["Retry-After"]) > 60  # the start of next month
        assert '"month";r=0;' in refused.headers["RateLimit"]
        await asyncio.sleep(0.6)  # a few flush intervals
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow(
            """SELECT r.usage_count, r.last_used_at, k.last_used_at AS key_used,
                      k.updated_at = k.created_at AS untouched
               FROM rate_limiting r JOIN api_keys k ON k.id = r.api_key_id
               WHERE k.key_prefix = $1""",
            key[:12],
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["usage_count"] == 5
    assert row["last_used_at"] is not None and row["key_used"] is not None
    assert row["untouched"], "usage bookkeeping does not count as an edit of the key"

    # Redis flushed and a new replica: the quota is still used up.
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()
    async with serve(settings, key) as api:
        again = await api.get("/v1/tokens/1")
        assert again.status == 429
        assert (await again.json())["error"]["code"] == "quota_exceeded"
        usage = (await api.json("/v1/usage"))["data"]["month"]
        assert usage == {**usage, "limit": 5, "used": 5, "remaining": 0}
