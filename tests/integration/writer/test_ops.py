"""The writer's ops endpoints and what its metrics report, with the real stack behind it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from tests.support.kafka import produce
from tests.support.writer import (
    Scraped,
    eventually,
    metric,
    ops_get,
    running_writer,
    scrape,
    writer_settings,
)
from tokvel_common.events import DeadLetter, MetricsSample
from tokvel_common.kafka import create_producer
from tokvel_common.serialization import decode
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import DEAD_LETTERS, METRICS, prefixed
from writer.settings import WriterSettings

pytestmark = pytest.mark.integration


async def _rows(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM token_metrics")
    return count


async def test_health_readiness_metrics_and_dead_letters(
    test_settings: CommonSettings, replay_slice: list[MetricsSample], db: asyncpg.Connection
) -> None:
    settings = writer_settings(test_settings)
    topic = prefixed(settings.topic_prefix, METRICS)
    samples = replay_slice[:300]
    async with running_writer(settings):
        _, body = await eventually(
            lambda: _ready(settings), what="/readyz to answer 200", within=30
        )
        assert body == {
            "status": "ready",
            "checks": {"postgres": True, "redis": True, "kafka": True},
        }
        assert (await ops_get(settings, "/healthz")) == (200, {"status": "ok"})

        # Every sample twice (a redelivery), and one message no model accepts.
        await produce(settings.kafka_bootstrap_servers, topic, [(s.cmc_id, s) for s in samples])
        await produce(settings.kafka_bootstrap_servers, topic, [(s.cmc_id, s) for s in samples])
        producer = create_producer(settings.kafka_bootstrap_servers, client_id="tests")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b'{"cmc_id": "x"}', key=b"1")
        finally:
            await producer.stop()

        await eventually(lambda: _rows_equal(db, len(samples)), what="rows written")
        scraped = await eventually(lambda: _all_counted(settings, len(samples)), what="counts")
    assert metric(scraped, "tokvel_writer_rows_written_total") == len(samples)
    assert metric(scraped, "tokvel_writer_batch_size_count") >= 1
    assert metric(scraped, "tokvel_writer_batch_latency_seconds_count") >= 1
    assert metric(scraped, "tokvel_writer_messages_rejected_total", reason="schema_violation") == 1
    assert metric(scraped, "tokvel_writer_postgres_up") == 1
    assert metric(scraped, "tokvel_writer_redis_up") == 1
    assert metric(scraped, "tokvel_writer_redis_errors_total", operation="update") == 0
    lags = [v for (name, _), v in scraped.items() if name == "tokvel_writer_consumer_lag"]
    assert lags and all(lag >= 0 for lag in lags)
    assert metric(scraped, "tokvel_writer_newest_event_timestamp_seconds") == max(
        s.ts.timestamp() for s in samples
    )

    letter = await _first_dead_letter(settings.kafka_bootstrap_servers, settings.topic_prefix)
    assert (letter.reason, letter.topic, letter.raw) == (
        "schema_violation",
        topic,
        '{"cmc_id": "x"}',
    )


async def _ready(settings: WriterSettings) -> tuple[int, Any] | None:
    try:
        status, body = await ops_get(settings, "/readyz")
    except OSError:
        return None
    return (status, body) if status == 200 else None


async def _rows_equal(db: asyncpg.Connection, count: int) -> bool:
    return await _rows(db) == count


async def _all_counted(settings: WriterSettings, duplicates: int) -> Scraped | None:
    """The metrics once the redeliveries and the malformed message were all processed."""
    scraped = await scrape(settings)
    done = (
        metric(scraped, "tokvel_writer_conflicts_skipped_total") == duplicates
        and sum(v for (n, _), v in scraped.items() if n == "tokvel_writer_messages_rejected_total")
        == 1
    )
    return scraped if done else None


async def _first_dead_letter(bootstrap_servers: str, prefix: str) -> DeadLetter:
    consumer = AIOKafkaConsumer(
        prefixed(prefix, DEAD_LETTERS),
        bootstrap_servers=bootstrap_servers,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()
    assert orjson.loads(record.value)["reason"] == "schema_violation"
    return decode(record.value, DeadLetter)
