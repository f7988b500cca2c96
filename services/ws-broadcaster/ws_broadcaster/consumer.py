"""Every record of ``token.metrics``, to every instance.

No consumer group: a group would split the partitions between the instances, and each instance
must see every update because its clients may subscribe to any token. Each instance assigns
itself all partitions (read from the topic's metadata) and starts at their end (the updates
that matter are the ones produced from now on; earlier state comes from the snapshot). Nothing
is committed.

Continuity: after a Kafka failure the consumer is rebuilt and continues from the positions it
had reached, so no live subscriber misses an update (the resume buffer's bookkeeping depends on
that). Partitions added to the topic while running are found by a periodic metadata check and
read from their beginning. ``isolation_level=read_committed`` (from the shared factory): an
aborted transaction of the velocity processor never reaches a client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from tokvel_common.kafka import create_consumer
from ws_broadcaster.broadcaster import YIELD_EVERY_RECORDS
from ws_broadcaster.resume import ResumeBuffer

log = logging.getLogger(__name__)

RecordHandler = Callable[[int, int, bytes | None, int | None], None]

FETCH_TIMEOUT_MS: Final = 500
MAX_RECORDS: Final = 1000
RETRY_FIRST_SECONDS: Final = 0.5
RETRY_MAX_SECONDS: Final = 10.0
UNKNOWN_TOPIC_OR_PARTITION: Final = 3


class MetricsConsumer:
    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str,
        client_id: str,
        buffer: ResumeBuffer,
        on_record: RecordHandler,
        partition_check_seconds: float = 60.0,
    ) -> None:
        self._bootstrap_servers = bootstrap_servers
        self._topic = topic
        self._client_id = client_id
        self._buffer = buffer
        self._on_record = on_record
        self._partition_check_seconds = partition_check_seconds
        self._positions: dict[TopicPartition, int] = {}  # next offset to read, per partition
        self._assigned_once = False
        self.ready = asyncio.Event()

    @property
    def partitions(self) -> int:
        return len(self._positions)

    async def run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                await self._session()
            except (KafkaError, OSError):
                log.warning("kafka consumer failed: restarting", exc_info=True)
            self.ready.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _session(self) -> None:
        consumer = create_consumer(
            bootstrap_servers=self._bootstrap_servers,
            group_id=None,
            client_id=self._client_id,
            auto_offset_reset="latest",
        )
        await consumer.start()
        try:
            await self._assign(consumer)
            self.ready.set()
            loop = asyncio.get_running_loop()
            next_check = loop.time() + self._partition_check_seconds
            while True:
                batches = await consumer.getmany(
                    timeout_ms=FETCH_TIMEOUT_MS, max_records=MAX_RECORDS
                )
                handled = 0
                for tp, records in batches.items():
                    for record in records:
                        self._on_record(tp.partition, record.offset, record.value, record.timestamp)
                        self._positions[tp] = record.offset + 1
                        handled += 1
                        if handled % YIELD_EVERY_RECORDS == 0:
                            await asyncio.sleep(0)
                if loop.time() >= next_check:
                    next_check = loop.time() + self._partition_check_seconds
                    await self._assign(consumer)
        finally:
            self.ready.clear()
            await consumer.stop()

    async def _partition_ids(self) -> list[int]:
        """The topic's partitions; waits while the topic does not exist yet."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap_servers, client_id=f"{self._client_id}-admin"
        )
        await admin.start()
        try:
            while True:
                (described,) = await admin.describe_topics([self._topic])
                if described["error_code"] == 0 and described["partitions"]:
                    return sorted(p["partition"] for p in described["partitions"])
                log.warning(
                    "waiting for the topic",
                    extra={"topic": self._topic, "error_code": described["error_code"]},
                )
                await asyncio.sleep(1.0)
        finally:
            await admin.close()

    async def _assign(self, consumer: AIOKafkaConsumer) -> None:
        """Assign every partition; known ones continue where they were, the others start at
        their end on the first assignment and at their beginning when added later."""
        partitions = [TopicPartition(self._topic, p) for p in await self._partition_ids()]
        if set(partitions) == set(consumer.assignment()):
            return
        first = not self._assigned_once
        consumer.assign(partitions)
        fresh = []
        for tp in partitions:
            position = self._positions.get(tp)
            if position is None:
                fresh.append(tp)
            else:
                consumer.seek(tp, position)
        if fresh:
            # One offsets request for all of them (one per partition costs a fetch cycle each).
            if first:
                await consumer.seek_to_end(*fresh)
            else:
                await consumer.seek_to_beginning(*fresh)
        for tp in fresh:
            position = await consumer.position(tp)
            self._positions[tp] = position
            self._buffer.start_partition(tp.partition, position)
            log.info(
                "reading partition",
                extra={"topic": tp.topic, "partition": tp.partition, "offset": position},
            )
        self._assigned_once = True
