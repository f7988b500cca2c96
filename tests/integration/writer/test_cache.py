"""The cache the writer keeps, on a standalone Redis and on the 3-master Redis Cluster.

The same code runs against both (REDIS_CLUSTER); every key of the contract is checked with
PTTL/TTL, list pages must go when new data changes them, values must be readable by any reader
of tokvel_common.cache (compressed or not), and every instance hears about new data.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from redis.exceptions import RedisError

from tests.support.kafka import produce
from tests.support.writer import eventually, running_writer, writer_settings
from tokvel_common.cache import (
    LIST_INDEX_KEY,
    VELOCITY_TIMEFRAMES,
    WARM_SENTINEL_KEY,
    ZLIB_MARKER,
    TokenSnapshot,
    VelocitySnapshot,
    access_bucket_key,
    decode_value,
    list_page_key,
    record_access,
    register_list_page,
    token_key,
    velocity_key,
    ws_subs_key,
)
from tokvel_common.events import MetricsSample, TokenInfo
from tokvel_common.invalidation import Invalidation, InvalidationListener
from tokvel_common.redis_client import RedisClient, create_redis
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import METRICS, TOKEN_INFO, prefixed
from writer.settings import WriterSettings

pytestmark = pytest.mark.integration


@pytest.fixture(params=["standalone", "cluster"])
def cache_settings(request: pytest.FixtureRequest, test_settings: CommonSettings) -> WriterSettings:
    if request.param == "cluster":
        url: str = request.getfixturevalue("cluster_url")
        return writer_settings(test_settings, redis_url=url, redis_cluster=True)
    return writer_settings(test_settings)


@pytest.fixture
async def client(cache_settings: WriterSettings) -> AsyncIterator[RedisClient]:
    redis = create_redis(
        cache_settings.redis_url.get_secret_value(), cluster=cache_settings.redis_cluster
    )
    try:
        yield redis
    finally:
        await redis.aclose()


def _first_snapshots(samples: Sequence[MetricsSample], count: int) -> list[MetricsSample]:
    times = sorted({s.ts for s in samples})[:count]
    return [s for s in samples if s.ts in times]


async def _has(client: RedisClient, key: str) -> bool:
    try:
        return bool(await client.exists(key))
    except RedisError:
        return False


async def _has_all(client: RedisClient, keys: Sequence[str]) -> bool:
    return [await _has(client, key) for key in keys] == [True] * len(keys)


async def _feed(settings: WriterSettings, samples: Sequence[MetricsSample]) -> None:
    topic = prefixed(settings.topic_prefix, METRICS)
    await produce(settings.kafka_bootstrap_servers, topic, [(s.cmc_id, s) for s in samples])


async def test_every_key_carries_its_ttl(
    cache_settings: WriterSettings, client: RedisClient, replay_slice: list[MetricsSample]
) -> None:
    samples = _first_snapshots(replay_slice, 1)
    async with running_writer(cache_settings):
        await _feed(cache_settings, samples)
        await eventually(
            lambda: _has_all(client, [token_key(s.cmc_id) for s in samples]), what="token keys"
        )
        # What the gateway and the broadcaster write, through the same module.
        pipe = client.pipeline(transaction=False)
        register_list_page(pipe, list_page_key("market_cap", 100, 0), b"[]", [1, 1027])
        record_access(pipe, 1, time.time())
        pipe.sadd(ws_subs_key(1), "connection-1")
        await pipe.execute()

        for sample in samples:
            assert 55_000 < await client.pttl(token_key(sample.cmc_id)) <= 60_000
            for timeframe in VELOCITY_TIMEFRAMES:
                ttl = await client.pttl(velocity_key(sample.cmc_id, timeframe))
                assert 295_000 < ttl <= 300_000
        assert 295 < await client.ttl(list_page_key("market_cap", 100, 0)) <= 300
        assert 295 < await client.ttl(LIST_INDEX_KEY) <= 300
        assert 895 < await client.ttl(access_bucket_key(time.time())) <= 900
        assert await client.ttl(ws_subs_key(1)) == -1  # never expires, never evicted
        assert await client.ttl(WARM_SENTINEL_KEY) == -1


async def test_values_are_readable_compressed_or_not(
    cache_settings: WriterSettings, client: RedisClient, replay_slice: list[MetricsSample]
) -> None:
    btc = next(s for s in replay_slice if s.cmc_id == 1)
    description = "Bitcoin is a decentralized digital currency without a central bank. " * 30
    info = TokenInfo(cmc_id=1, symbol="BTC", name="Bitcoin", description=description,
                     fetched_at=btc.ts)  # fmt: skip
    async with running_writer(cache_settings):
        await _feed(cache_settings, [btc])
        await eventually(lambda: _has(client, token_key(1)), what="token:1")
        plain = await client.get(token_key(1))
        assert plain is not None and plain[:1] == b"{"
        assert decode_value(plain, TokenSnapshot).metrics == btc

        topic = prefixed(cache_settings.topic_prefix, TOKEN_INFO)
        await produce(cache_settings.kafka_bootstrap_servers, topic, [(1, info)])
        compressed = await eventually(
            lambda: _compressed(client, token_key(1)), what="metadata to reach token:1"
        )
    snapshot = decode_value(compressed, TokenSnapshot)
    assert snapshot.token.description == description and snapshot.metrics == btc
    velocity = await client.get(velocity_key(1, "24h"))
    assert velocity is not None
    assert decode_value(velocity, VelocitySnapshot).velocity == btc.velocity_24h


async def _compressed(client: RedisClient, key: str) -> bytes | None:
    value = await client.get(key)
    return value if isinstance(value, bytes) and value[:1] == ZLIB_MARKER else None


async def test_new_data_drops_the_list_pages_it_changes(
    cache_settings: WriterSettings, client: RedisClient, replay_slice: list[MetricsSample]
) -> None:
    times = sorted({s.ts for s in replay_slice})
    first = [s for s in replay_slice if s.ts == times[0]]
    second = next(s for s in replay_slice if s.ts == times[1] and s.cmc_id == 1027)
    pages = {
        "velocity": list_page_key("velocity", 10, 0),  # sorted by a metric: any sample moves it
        "symbol_eth": list_page_key("symbol", 10, 0),  # holds ETH
        "symbol_other": list_page_key("symbol", 10, 10),  # holds neither
    }
    announced: set[int] = set()
    listener = InvalidationListener(
        client,
        cache_settings.redis_url.get_secret_value(),
        lambda message: announced.update(message.cmc_ids),
        lambda: None,
    )
    async with running_writer(cache_settings), _running(listener):
        await _feed(cache_settings, first)
        # Announced only once its cache update (and page drops) is complete.
        everything = {s.cmc_id for s in first}
        await eventually(lambda: _true(announced >= everything), what="the first snapshot")
        pipe = client.pipeline(transaction=False)
        register_list_page(pipe, pages["velocity"], b"[]", [1, 52])
        register_list_page(pipe, pages["symbol_eth"], b"[]", [1027, 2])
        register_list_page(pipe, pages["symbol_other"], b"[]", [74, 825])
        await pipe.execute()

        await _feed(cache_settings, [second])  # ETH only; no new token
        await eventually(
            lambda: _gone(client, pages["velocity"], pages["symbol_eth"]), what="pages dropped"
        )
        assert await client.exists(pages["symbol_other"]) == 1
        index = await client.hgetall(LIST_INDEX_KEY)
        assert set(index) == {pages["symbol_other"].encode()}


async def _true(condition: bool) -> bool:
    return condition


@contextlib.asynccontextmanager
async def _running(listener: InvalidationListener) -> AsyncIterator[None]:
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.subscribed.wait(), 10)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _gone(client: RedisClient, *keys: str) -> bool:
    return [await client.exists(key) for key in keys] == [0] * len(keys)


async def test_every_instance_hears_about_new_data(
    cache_settings: WriterSettings, client: RedisClient, replay_slice: list[MetricsSample]
) -> None:
    """Two listeners stand for two instances of a service with an in-process cache."""
    received: list[list[Invalidation]] = [[], []]
    resets = [0, 0]
    url = cache_settings.redis_url.get_secret_value()

    def listener(i: int) -> InvalidationListener:
        def reset() -> None:
            resets[i] += 1

        return InvalidationListener(client, url, received[i].append, reset)

    btc = next(s for s in replay_slice if s.cmc_id == 1)
    async with _running(listener(0)), _running(listener(1)), running_writer(cache_settings):
        await _feed(cache_settings, [btc])
        await eventually(lambda: _both_heard(received), what="both instances to hear")
    assert resets == [1, 1]  # each dropped its whole cache once, when it subscribed
    for messages in received:
        assert Invalidation(kind="metrics", cmc_ids=[1]) in messages


async def _both_heard(received: list[list[Invalidation]]) -> bool:
    return all(any(m.kind == "metrics" for m in messages) for messages in received)
