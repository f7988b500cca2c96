"""Outages of the writer's dependencies, made real.

PostgreSQL: the shared server cannot be stopped, so the writer reaches it through a TCP proxy
that the test cuts (connections killed, new ones refused) and restores. Redis: a redis-server
of the test's own, stopped and started again (empty, with a new run id, like a crashed cache).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.integration.writer.conftest import PrivateRedis
from tests.support.kafka import group_lag, produce
from tests.support.tcp_proxy import TcpProxy
from tests.support.writer import (
    Scraped,
    eventually,
    metric,
    ops_get,
    running_writer,
    scrape,
    writer_settings,
)
from tokvel_common.cache import TokenSnapshot, decode_value, token_key, velocity_key
from tokvel_common.events import MetricsSample
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import METRICS, TOKEN_INFO, prefixed
from writer.settings import WriterSettings

pytestmark = pytest.mark.integration


async def _rows(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM token_metrics")
    return count


async def _rows_equal(db: asyncpg.Connection, count: int) -> bool:
    return await _rows(db) == count


async def _lag(settings: WriterSettings) -> int:
    topics = [prefixed(settings.topic_prefix, t) for t in (METRICS, TOKEN_INFO)]
    group = prefixed(settings.topic_prefix, settings.writer_group_id)
    return await group_lag(settings.kafka_bootstrap_servers, group, topics)


async def _lag_is_zero(settings: WriterSettings) -> bool:
    return await _lag(settings) == 0


def _snapshots(samples: Sequence[MetricsSample], first: int, count: int) -> list[MetricsSample]:
    """Samples of ``count`` consecutive snapshots of the recording, from the ``first``."""
    times = sorted({s.ts for s in samples})[first : first + count]
    return [s for s in samples if times[0] <= s.ts <= times[-1]]


async def test_postgresql_outage_pauses_consumption_then_resumes_by_itself(
    test_settings: CommonSettings,
    database_url: str,
    replay_slice: list[MetricsSample],
    db: asyncpg.Connection,
) -> None:
    target = urlsplit(database_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    proxied = urlunsplit(
        target._replace(netloc=f"{target.username}:{target.password}@127.0.0.1:{proxy.port}")
    )
    settings = writer_settings(test_settings, database_url=proxied)
    topic = prefixed(settings.topic_prefix, METRICS)
    before, during = _snapshots(replay_slice, 0, 5), _snapshots(replay_slice, 5, 5)
    try:
        async with running_writer(settings):
            await produce(settings.kafka_bootstrap_servers, topic, [(s.cmc_id, s) for s in before])
            await eventually(lambda: _rows_equal(db, len(before)), what="the first rows")
            await eventually(lambda: _lag_is_zero(settings), what="the first commit")

            await proxy.cut()
            await produce(settings.kafka_bootstrap_servers, topic, [(s.cmc_id, s) for s in during])
            scraped = await eventually(
                lambda: _scrape_failures(settings), what="failed batch attempts", within=20
            )
            await asyncio.sleep(2.0)  # several retries while PostgreSQL is away
            # Nothing written, nothing committed: the whole outage's messages are still ahead.
            assert await _rows(db) == len(before)
            assert await _lag(settings) == len(during)
            status, body = await ops_get(settings, "/readyz")
            assert status == 503 and body["checks"]["postgres"] is False
            assert metric(scraped, "tokvel_writer_postgres_up") == 0

            await proxy.start()  # PostgreSQL is back
            await eventually(lambda: _rows_equal(db, len(before) + len(during)), what="catch-up")
            await eventually(lambda: _lag_is_zero(settings), what="the commit after catch-up")
            scraped = await scrape(settings)
            assert metric(scraped, "tokvel_writer_postgres_up") == 1
    finally:
        await proxy.cut()
    stored = await db.fetch(
        'SELECT t.cmc_id, m."timestamp" FROM token_metrics m JOIN tokens t ON t.id = m.token_id'
    )
    assert {(r["cmc_id"], r["timestamp"]) for r in stored} == {
        (s.cmc_id, s.ts) for s in [*before, *during]
    }


async def _scrape_failures(settings: WriterSettings) -> Scraped | None:
    scraped = await scrape(settings)
    failures = sum(
        v for (name, _), v in scraped.items() if name == "tokvel_writer_batch_failures_total"
    )
    return scraped if failures >= 2 else None


async def _scrape_at_least(
    settings: WriterSettings, name: str, minimum: float, **labels: str
) -> Scraped | None:
    scraped = await scrape(settings)
    return scraped if metric(scraped, name, **labels) >= minimum else None


async def _scrape_when_caught_up(settings: WriterSettings) -> Scraped | None:
    scraped = await scrape(settings)
    return scraped if metric(scraped, "tokvel_writer_cache_pending_tokens") == 0 else None


async def _cached(client: Redis, samples: Sequence[MetricsSample]) -> bool:
    """Every token of ``samples`` is cached with its newest sample of them."""
    newest: dict[int, MetricsSample] = {}
    for s in samples:
        if s.cmc_id not in newest or s.ts > newest[s.cmc_id].ts:
            newest[s.cmc_id] = s
    try:
        values = await client.mget([token_key(i) for i in newest])
    except RedisError:  # the test's own connection may predate the restart
        return False
    return all(
        value is not None and decode_value(value, TokenSnapshot).metrics == newest[cmc_id]
        for cmc_id, value in zip(newest, values, strict=True)
    )


async def test_redis_outage_leaves_postgresql_unaffected_and_the_cache_catches_up(
    test_settings: CommonSettings,
    private_redis: PrivateRedis,
    replay_slice: list[MetricsSample],
    db: asyncpg.Connection,
) -> None:
    settings = writer_settings(test_settings, redis_url=private_redis.url)
    topic = prefixed(settings.topic_prefix, METRICS)
    before, during = _snapshots(replay_slice, 0, 3), _snapshots(replay_slice, 3, 3)
    client = Redis.from_url(private_redis.url)
    try:
        async with running_writer(settings):
            await produce(settings.kafka_bootstrap_servers, topic, [(s.cmc_id, s) for s in before])
            await eventually(lambda: _cached(client, before), what="the cache to fill")

            private_redis.stop()
            await produce(settings.kafka_bootstrap_servers, topic, [(s.cmc_id, s) for s in during])
            # PostgreSQL does not wait for Redis: every row lands and is committed.
            await eventually(lambda: _rows_equal(db, len(before) + len(during)), what="rows")
            await eventually(lambda: _lag_is_zero(settings), what="commits without Redis")
            # redis-py retries a refused connection with backoff before the error surfaces.
            scraped = await eventually(
                lambda: _scrape_at_least(
                    settings, "tokvel_writer_redis_errors_total", 1, operation="update"
                ),
                what="a failed cache update",
            )
            assert metric(scraped, "tokvel_writer_cache_pending_tokens") > 0

            private_redis.start()  # empty, as after a crash without persistence
            await eventually(lambda: _cached(client, during), what="the cache to catch up")
            ids = sorted({s.cmc_id for s in during})
            for cmc_id in ids:
                assert 55_000 < await client.pttl(token_key(cmc_id)) <= 60_000
                for timeframe in ("1h", "4h", "12h", "24h", "7d"):
                    ttl = await client.pttl(velocity_key(cmc_id, timeframe))
                    assert 295_000 < ttl <= 300_000
            # The warmer may refill the keys before the cache writer's retry backoff ends;
            # the writer's own backlog then clears at its next attempt.
            scraped = await eventually(
                lambda: _scrape_when_caught_up(settings), what="the writer's backlog to clear"
            )
            assert metric(scraped, "tokvel_writer_redis_up") == 1
    finally:
        await client.aclose()
