"""Records sent as aiokafka record batches: one builder per topic partition, one send each.

``producer.send()`` costs a metadata check, a partitioner call, an accumulator append and a
future per record, which was most of the delivery cost per quote; a ``BatchBuilder`` appends a
record in C, and the batch has one future. Records of one partition keep their order: a
partition's batches are handed to the producer in the order they were filled, and aiokafka
sends a partition's batches one after the other.

Faust's producer has no batch API, so this uses the aiokafka producer inside it (the same one,
configured by the app: acks=all, linger, batch size).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.structs import TopicPartition

# topic, key, value, partition (None: the producer's default partitioner, by key).
Record = tuple[str, bytes | None, bytes, int | None]

# One entry per distinct key: the tokens (a few thousand), bounded anyway.
_KEY_HASHES: Final = 65_536


@lru_cache(maxsize=_KEY_HASHES)
def _key_hash(key: bytes) -> int:
    # DefaultPartitioner's (the Java client's) hash of a key, which is pure Python and costs
    # as much as the rest of a record's send: the keys are the tokens' ids, so it is cached.
    hashed: int = murmur2(key) & 0x7FFFFFFF
    return hashed


@dataclass(frozen=True, slots=True)
class Written:
    """One acknowledged batch: its topic partition and the offset of its last record."""

    tp: TopicPartition
    last_offset: int


class RecordPublisher:
    """Sends records in batches per topic partition and waits for the broker's acks."""

    def __init__(self, producer: Callable[[], AIOKafkaProducer]) -> None:
        self._producer = producer  # looked up per call: Faust creates it when it starts
        self._random = DefaultPartitioner()

    async def publish(self, records: Iterable[Record]) -> list[Written]:
        """Send every record; return once every batch is acknowledged (raises if one fails)."""
        producer = self._producer()
        partitions: dict[str, list[int]] = {}
        builders: dict[tuple[str, int], Any] = {}
        pending: list[tuple[TopicPartition, int, Awaitable[Any]]] = []
        for topic, key, value, partition in records:
            if partition is None:
                if topic not in partitions:
                    partitions[topic] = sorted(await producer.partitions_for(topic))
                partition = self._partition(key, partitions[topic])
            builder = builders.get((topic, partition))
            if builder is None:
                builder = builders[topic, partition] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                # Full: send it; an empty builder always takes one record, whatever its size.
                pending.append(await self._send(producer, builder, topic, partition))
                builder = builders[topic, partition] = producer.create_batch()
                builder.append(key=key, value=value, timestamp=None)
        for (topic, partition), builder in builders.items():
            pending.append(await self._send(producer, builder, topic, partition))
        acknowledged = await asyncio.gather(*(delivery for _, _, delivery in pending))
        return [
            Written(tp, metadata.offset + count - 1)
            for (tp, count, _), metadata in zip(pending, acknowledged, strict=True)
        ]

    def _partition(self, key: bytes | None, partitions: list[int]) -> int:
        if key is None:
            chosen: int = self._random(None, partitions, partitions)
            return chosen
        return partitions[_key_hash(key) % len(partitions)]

    @staticmethod
    async def _send(
        producer: AIOKafkaProducer, builder: Any, topic: str, partition: int
    ) -> tuple[TopicPartition, int, Awaitable[Any]]:
        delivery = await producer.send_batch(builder, topic, partition=partition)
        return TopicPartition(topic, partition), builder.record_count(), delivery
