"""The two plainest round trips: aiokafka with tokvel's producer settings, and Redis with a TTL."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from tokvel_common.kafka import create_consumer, create_producer
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import RAW_QUOTES, prefixed

pytestmark = pytest.mark.integration


async def test_idempotent_acks_all_produce_then_consume(
    settings: CommonSettings, topic_prefix: str
) -> None:
    topic = prefixed(topic_prefix, RAW_QUOTES)
    producer = create_producer(settings.kafka_bootstrap_servers, client_id="smoke")
    await producer.start()
    try:
        sent = {str(cmc_id).encode(): f"quote-{cmc_id}".encode() for cmc_id in range(1, 201)}
        futures = [await producer.send(topic, value=v, key=k) for k, v in sent.items()]
        metadata = await asyncio.gather(*futures)
        # The broker gave this producer an id: its retries are de-duplicated broker-side.
        assert producer._txn_manager is not None
        assert producer._txn_manager.producer_id >= 0
    finally:
        await producer.stop()
    assert all(m.offset >= 0 for m in metadata)

    consumer = create_consumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=f"smoke-{uuid.uuid4().hex}",
        client_id="smoke",
    )
    await consumer.start()
    received: dict[bytes, bytes] = {}
    try:
        async with asyncio.timeout(30):
            while len(received) < len(sent):
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    for record in records:
                        assert record.key is not None and record.value is not None
                        received[record.key] = record.value
    finally:
        await consumer.stop()
    assert received == sent


async def test_redis_round_trip_with_ttl(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        await client.set("token:1", b'{"velocity": 0.5}', ex=60)
        assert await client.get("token:1") == b'{"velocity": 0.5}'
        ttl_ms = await client.pttl("token:1")
        assert 59_000 < ttl_ms <= 60_000
        await client.set("ws_subs:1", b"x")
        assert await client.ttl("ws_subs:1") == -1  # no TTL: never expires on its own
    finally:
        await client.aclose()
