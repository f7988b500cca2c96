"""Producing test messages and reading a consumer group's progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import BaseModel

from tokvel_common.kafka import create_producer
from tokvel_common.serialization import encode, encode_key
from tokvel_common.topics import TOPICS, prefixed


async def wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str]) -> None:
    """New topics answer NotLeader until every partition has a leader: wait for that."""
    async with asyncio.timeout(30):
        while True:
            described = await admin.describe_topics(topics)
            if all(
                t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ):
                return
            await asyncio.sleep(0.1)


@asynccontextmanager
async def tokvel_topics(bootstrap_servers: str, prefix: str) -> AsyncIterator[list[str]]:
    """Every tokvel topic under ``prefix``, with its partitions and configs, ready to use
    (each partition has a leader); deleted on the way out."""
    names = [prefixed(prefix, spec.name) for spec in TOPICS]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    prefixed(prefix, spec.name),
                    num_partitions=spec.partitions,
                    replication_factor=1,
                    topic_configs=spec.config,
                )
                for spec in TOPICS
            ]
        )
        await wait_for_leaders(admin, names)
        yield names
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def produce(
    bootstrap_servers: str,
    topic: str,
    messages: Sequence[tuple[int, BaseModel]],
    *,
    chunk: int | None = None,
    pause_seconds: float = 0.0,
) -> None:
    """``(cmc_id, model)`` pairs, keyed like every tokvel topic; optionally throttled."""
    producer = create_producer(bootstrap_servers, client_id="tests")
    await producer.start()
    try:
        size = chunk or len(messages) or 1
        for start in range(0, len(messages), size):
            futures = [
                await producer.send(topic, encode(model), key=encode_key(cmc_id))
                for cmc_id, model in messages[start : start + size]
            ]
            await asyncio.gather(*futures)
            if pause_seconds:
                await asyncio.sleep(pause_seconds)
    finally:
        await producer.stop()


async def group_lag(bootstrap_servers: str, group_id: str, topics: Sequence[str]) -> int:
    """Messages of ``topics`` not yet committed by ``group_id`` (uncommitted counts in full)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(
                consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
            )
        ]
        ends = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group_id)
        return sum(
            end - (committed[tp].offset if tp in committed else 0) for tp, end in ends.items()
        )
    finally:
        await consumer.stop()
        await admin.close()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # the topic may be new to this client
    return consumer.partitions_for_topic(topic) or set()


async def read_records(
    bootstrap_servers: str, topic: str, *, within: float = 60.0
) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every record of every partition, from the start to the end it had when
    the read began (no group: nothing committed)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        assert ends, f"{topic}: no partitions"
        records: list[tuple[bytes | None, bytes | None]] = []
        async with asyncio.timeout(within):
            while any([await consumer.position(tp) < end for tp, end in ends.items()]):
                batches = await consumer.getmany(timeout_ms=1_000, max_records=10_000)
                for tp, batch in batches.items():
                    records.extend((r.key, r.value) for r in batch if r.offset < ends[tp])
        return records
    finally:
        await consumer.stop()
