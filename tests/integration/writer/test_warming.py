"""Cache warming: the top 100 by market cap come back after FLUSHALL and after a restart;
popular tokens are refreshed before their TTL runs out."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from tests.integration.writer.conftest import PrivateRedis
from tests.support.kafka import produce
from tests.support.writer import eventually, metric, running_writer, scrape, writer_settings
from tokvel_common.cache import (
    VELOCITY_TIMEFRAMES,
    TokenSnapshot,
    decode_value,
    record_access,
    token_key,
    velocity_key,
)
from tokvel_common.events import MetricsSample
from tokvel_common.redis_client import RedisClient
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import METRICS, prefixed
from writer.settings import WriterSettings

pytestmark = pytest.mark.integration


def _first_snapshot(samples: Sequence[MetricsSample]) -> list[MetricsSample]:
    return [s for s in samples if s.ts == samples[0].ts]


def _top_100(snapshot: Sequence[MetricsSample]) -> list[int]:
    ranked = sorted(snapshot, key=lambda s: (-(s.market_cap_usd or -1), s.cmc_id))
    return [s.cmc_id for s in ranked[:100]]


async def _warm(client: RedisClient, cmc_ids: Sequence[int]) -> bool:
    """Every token's keys are back, holding its metrics, with live TTLs."""
    try:
        for cmc_id in cmc_ids:
            value = await client.get(token_key(cmc_id))
            if value is None or decode_value(value, TokenSnapshot).token.cmc_id != cmc_id:
                return False
            if not 55_000 < await client.pttl(token_key(cmc_id)) <= 60_000:
                return False
            for timeframe in VELOCITY_TIMEFRAMES:
                if not 295_000 < await client.pttl(velocity_key(cmc_id, timeframe)) <= 300_000:
                    return False
    except RedisError:
        return False
    return True


async def _feed_and_wait(
    settings: WriterSettings, client: RedisClient, samples: list[MetricsSample]
) -> None:
    topic = prefixed(settings.topic_prefix, METRICS)
    await produce(settings.kafka_bootstrap_servers, topic, [(s.cmc_id, s) for s in samples])
    await eventually(lambda: _warm(client, [s.cmc_id for s in samples]), what="data cached")


async def test_flushall_and_a_restart_bring_the_top_100_back(
    test_settings: CommonSettings,
    private_redis: PrivateRedis,
    replay_slice: list[MetricsSample],
) -> None:
    snapshot = _first_snapshot(replay_slice)
    assert len(snapshot) > 150
    top = _top_100(snapshot)
    settings = writer_settings(test_settings, redis_url=private_redis.url)
    client = Redis.from_url(private_redis.url)
    try:
        async with running_writer(settings):
            await _feed_and_wait(settings, client, snapshot)

            await client.flushall()
            await eventually(lambda: _warm(client, top), what="top 100 after FLUSHALL")
            # Only the top 100 come back: the rest waits for new data.
            rest = sorted(set(s.cmc_id for s in snapshot) - set(top))
            assert [await client.exists(token_key(i)) for i in rest] == [0] * len(rest)

            private_redis.stop()
            private_redis.start()  # no persistence: empty, with a new run id
            await eventually(lambda: _warm(client, top), what="top 100 after a restart")
            scraped = await scrape(settings)
    finally:
        await client.aclose()
    assert metric(scraped, "tokvel_cache_warm_runs_total", reason="start") == 1
    assert metric(scraped, "tokvel_cache_warm_runs_total", reason="flush") == 1
    assert metric(scraped, "tokvel_cache_warm_runs_total", reason="restart") == 1
    assert metric(scraped, "tokvel_cache_warmed_tokens_total") >= 200


async def test_flushall_on_the_cluster_brings_the_top_100_back(
    test_settings: CommonSettings, cluster_url: str, replay_slice: list[MetricsSample]
) -> None:
    snapshot = _first_snapshot(replay_slice)
    settings = writer_settings(test_settings, redis_url=cluster_url, redis_cluster=True)
    client = RedisCluster.from_url(cluster_url)
    try:
        async with running_writer(settings):
            await _feed_and_wait(settings, client, snapshot)
            await client.flushall(target_nodes=RedisCluster.PRIMARIES)
            await eventually(lambda: _warm(client, _top_100(snapshot)), what="top 100 back")
    finally:
        await client.aclose()


async def test_popular_tokens_are_refreshed_before_they_expire(
    test_settings: CommonSettings, redis_url: str, replay_slice: list[MetricsSample]
) -> None:
    snapshot = _first_snapshot(replay_slice)
    settings = writer_settings(test_settings, writer_popular_min_hits=3)
    client = Redis.from_url(redis_url)
    # Outside the top 100, so that no warm-up can be what renews the unpopular one.
    popular, unpopular = [i for i in (s.cmc_id for s in snapshot) if i not in _top_100(snapshot)][
        :2
    ]
    try:
        async with running_writer(settings):
            await _feed_and_wait(settings, client, snapshot)
            pipe = client.pipeline(transaction=False)
            for _ in range(5):
                record_access(pipe, popular, time.time())
            record_access(pipe, unpopular, time.time())  # read once: not popular
            # Both about to expire, as if their last sample were almost a minute old.
            pipe.pexpire(token_key(popular), 3000)
            pipe.pexpire(token_key(unpopular), 3000)
            await pipe.execute()

            await eventually(
                lambda: _ttl_above(client, token_key(popular), 50_000), what="refresh", within=10
            )
            assert await client.pttl(token_key(unpopular)) <= 3000
            scraped = await scrape(settings)
    finally:
        await client.aclose()
    assert metric(scraped, "tokvel_cache_popular_refreshed_total") >= 1
    assert metric(scraped, "tokvel_cache_popular_checks_total", result="hit") >= 1


async def _ttl_above(client: Redis, key: str, ms: int) -> bool:
    return bool(await client.pttl(key) > ms)
