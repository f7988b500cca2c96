"""Fixtures of the broadcaster's integration tests: real Kafka topics, PostgreSQL, Redis.

The WebSocket suite uses a Redis database of its own (``WS_REDIS_DB``): its assertions read
``ws_subs`` sets while broadcaster processes run, and the shared test database is flushed by
other suites' fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import Redis

from tests.support.ws import create_key, ws_settings
from tokvel_common.settings import CommonSettings
from ws_broadcaster.settings import WsSettings

WS_REDIS_DB = 12


@pytest.fixture
async def redis_url(settings: CommonSettings) -> AsyncIterator[str]:
    base = settings.redis_url.get_secret_value()
    url = urlunsplit(urlsplit(base)._replace(path=f"/{WS_REDIS_DB}"))
    client = Redis.from_url(url)
    try:
        await client.flushdb()
        yield url
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def make_settings(
    settings: CommonSettings, topic_prefix: str, database_url: str, redis_url: str
) -> Callable[..., WsSettings]:
    def build(**overrides: Any) -> WsSettings:
        return ws_settings(
            settings,
            topic_prefix=topic_prefix,
            database_url=overrides.pop("database_url", database_url),
            redis_url=overrides.pop("redis_url", redis_url),
            **overrides,
        )

    return build


@pytest.fixture
async def key(database_url: str) -> str:
    return await create_key(database_url, tier="pro")
