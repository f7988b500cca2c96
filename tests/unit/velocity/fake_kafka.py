"""A fake of the aiokafka producer's batch API (what velocity.publish uses): no broker, and the
test decides when (and whether) each batch is acknowledged."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

PARTITIONS = 6


@dataclass
class Metadata:
    offset: int  # of the batch's first record


@dataclass
class FakeBatch:
    """aiokafka's BatchBuilder as the publisher uses it; full after ``capacity`` records."""

    capacity: int
    records: list[tuple[bytes | None, bytes]] = field(default_factory=list)

    def append(self, *, key: bytes | None, value: bytes, timestamp: None) -> object | None:
        if len(self.records) == self.capacity:
            return None
        self.records.append((key, value))
        return object()

    def record_count(self) -> int:
        return len(self.records)


@dataclass
class FakeProducer:
    """The aiokafka producer's batch API: send_batch() -> a delivery future per batch.

    Every record is recorded when its batch is sent; its delivery resolves when the test says
    so (or at once with ``auto_ack``).
    """

    auto_ack: bool = True
    fail: int = 0  # the next `fail` deliveries fail
    batch_capacity: int = 1000
    sent: list[tuple[str, bytes | None, bytes, int]] = field(default_factory=list)
    pending: list[tuple[asyncio.Future[Metadata], int]] = field(default_factory=list)
    next_offset: dict[tuple[str, int], int] = field(default_factory=dict)

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(PARTITIONS))

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.batch_capacity)

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[Metadata]:
        delivery: asyncio.Future[Metadata] = asyncio.get_running_loop().create_future()
        self.sent.extend((topic, key, value, partition) for key, value in batch.records)
        offset = self.next_offset.get((topic, partition), 0)
        self.next_offset[topic, partition] = offset + batch.record_count()
        if self.fail:
            self.fail -= 1
            delivery.set_exception(ConnectionError("broker gone"))
        elif self.auto_ack:
            delivery.set_result(Metadata(offset))
        else:
            self.pending.append((delivery, batch.record_count()))
        return delivery

    def ack_pending(self) -> int:
        """Acknowledge every pending batch; the number of records they held."""
        pending, self.pending = self.pending, []
        for delivery, _ in pending:
            delivery.set_result(Metadata(0))
        return sum(count for _, count in pending)

    def to(self, topic: str) -> list[tuple[bytes | None, bytes, int]]:
        return [
            (key, value, partition) for sent, key, value, partition in self.sent if sent == topic
        ]
