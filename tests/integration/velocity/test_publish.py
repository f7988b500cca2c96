"""velocity.publish against the real broker: partitions, order, reported offsets, failures."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from tests.support.kafka import wait_for_leaders
from tokvel_common.settings import CommonSettings
from velocity.publish import Record, RecordPublisher, Written

PARTITIONS = 6
# One record per batch: small enough that a ~100-byte value fills a batch.
SMALL_BATCH_BYTES = 100
TOPIC_MAX_MESSAGE_BYTES = 1_000

Located = tuple[bytes | None, bytes, int, int]  # key, value, partition, offset


@asynccontextmanager
async def fresh_topics(bootstrap: str, *configs: dict[str, str]) -> AsyncIterator[list[str]]:
    names = [f"test-publish-{uuid.uuid4().hex[:10]}" for _ in configs]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, PARTITIONS, 1, topic_configs=config)
                for name, config in zip(names, configs, strict=True)
            ]
        )
        await wait_for_leaders(admin, names)
        yield names
        await admin.delete_topics(names)
    finally:
        await admin.close()


@asynccontextmanager
async def producer(bootstrap: str, **options: int) -> AsyncIterator[AIOKafkaProducer]:
    started = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **options)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


async def records_of(bootstrap: str, topic: str) -> list[Located]:
    """Every record of ``topic`` with its partition and offset, partition by partition."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
        found: list[Located] = []
        async with asyncio.timeout(30):
            while len(found) < sum(ends.values()):
                batches = await consumer.getmany(timeout_ms=500)
                for tp, batch in batches.items():
                    found.extend((r.key, r.value, tp.partition, r.offset) for r in batch)
        return sorted(found, key=lambda r: (r[2], r[3]))
    finally:
        await consumer.stop()


async def test_keys_go_to_the_partitions_aiokafka_send_chooses(settings: CommonSettings) -> None:
    bootstrap = settings.kafka_bootstrap_servers
    keys = [str(cmc_id).encode() for cmc_id in (1, 2, 52, 1027, 1839, 5_426, 29_870, 74)]
    async with fresh_topics(bootstrap, {}, {}) as (batched, sent), producer(bootstrap) as kafka:
        written = await RecordPublisher(lambda: kafka).publish(
            [(batched, key, b"v" + key, None) for key in keys] + [(batched, None, b"no key", None)]
        )
        await asyncio.gather(*[await kafka.send(sent, b"v" + key, key=key) for key in keys])
        by_publisher = await records_of(bootstrap, batched)
        by_send = await records_of(bootstrap, sent)

    expected = {key: partition for key, _, partition, _ in by_send}
    assert {key: partition for key, _, partition, _ in by_publisher if key} == expected
    assert len(set(expected.values())) > 1  # the keys do spread over partitions
    assert [value for key, value, _, _ in by_publisher if key is None] == [b"no key"]
    # One batch per partition used, each reported with the offset of its last record.
    last_offsets = {}
    for _, _, partition, offset in by_publisher:
        last_offsets[TopicPartition(batched, partition)] = offset
    assert sorted(written, key=lambda w: w.tp.partition) == [
        Written(tp, offset) for tp, offset in sorted(last_offsets.items())
    ]


async def test_full_batches_keep_the_order_and_report_their_last_offsets(
    settings: CommonSettings,
) -> None:
    bootstrap = settings.kafka_bootstrap_servers
    async with (
        fresh_topics(bootstrap, {}) as (topic,),
        producer(bootstrap, max_batch_size=SMALL_BATCH_BYTES) as kafka,
    ):
        already = [await kafka.send(topic, b"before", partition=3) for _ in range(40)]
        await asyncio.gather(*already)
        records: list[Record] = [(topic, b"k", f"{n:060d}".encode(), 3) for n in range(5)]
        records.append((topic, b"k", b"other partition", 0))
        written = await RecordPublisher(lambda: kafka).publish(records)
        stored = await records_of(bootstrap, topic)

    on_3 = [(value, offset) for _, value, partition, offset in stored if partition == 3]
    assert on_3[40:] == [(f"{n:060d}".encode(), 40 + n) for n in range(5)]
    assert len(written) > 2  # the batches did fill up: several per partition
    assert [w.last_offset for w in written if w.tp.partition == 3][-1] == 44
    assert [w for w in written if w.tp.partition == 0] == [Written(TopicPartition(topic, 0), 0)]
    reported = sorted(w.last_offset for w in written if w.tp.partition == 3)
    assert reported == sorted(set(reported)) and all(40 <= o <= 44 for o in reported)


async def test_a_batch_the_broker_refuses_fails_the_publish(settings: CommonSettings) -> None:
    bootstrap = settings.kafka_bootstrap_servers
    too_big = b"x" * (2 * TOPIC_MAX_MESSAGE_BYTES)
    async with (
        fresh_topics(bootstrap, {"max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES)}) as (topic,),
        producer(bootstrap) as kafka,
    ):
        with pytest.raises(KafkaError):
            await RecordPublisher(lambda: kafka).publish(
                [(topic, b"1", b"fits", 0), (topic, b"1", too_big, 1)]
            )
