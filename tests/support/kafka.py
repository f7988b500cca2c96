"""Producing test messages and reading a consumer group's progress."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import BaseModel

from tokvel_common.kafka import create_producer
from tokvel_common.serialization import encode, encode_key


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
