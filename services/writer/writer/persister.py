"""One batch made durable: decode, partitions, one PostgreSQL transaction, dead letters.

:meth:`BatchPersister.prepare` does the CPU work (decoding, exact numbers), :meth:`write` the
I/O. The consumer loop commits the batch's offsets only after ``write`` returns. Any exception
means nothing of the batch may be considered done: the loop pauses and writes the same batch
again, which is harmless because every write is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer

from tokvel_common.cache import CacheChange
from tokvel_common.events import DeadLetter, MetricsSample
from tokvel_common.serialization import encode
from writer.batcher import Batch, DecodedBatch, decode_batch
from writer.cache_writer import CacheWriter
from writer.maintenance import PartitionDays, event_day
from writer.metrics import WriterMetrics
from writer.repository import BatchRows, WriterRepository, batch_rows

log = logging.getLogger(__name__)


class KafkaDeadLetters:
    """Rejected messages to the dead-letter topic (acks=all) before their offsets move on."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def send(self, letters: Sequence[tuple[bytes | None, DeadLetter]]) -> None:
        futures = [
            await self._producer.send(self._topic, encode(letter), key=key)
            for key, letter in letters
        ]
        await asyncio.gather(*futures)


@dataclass(frozen=True)
class PreparedBatch:
    batch: Batch
    decoded: DecodedBatch
    samples: list[MetricsSample]  # those within the retention
    rows: BatchRows


class BatchPersister:
    def __init__(
        self,
        repository: WriterRepository,
        days: PartitionDays,
        cache_writer: CacheWriter,
        dead_letters: KafkaDeadLetters,
        metrics: WriterMetrics,
        *,
        metrics_topic: str,
        info_topic: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._repository = repository
        self._days = days
        self._cache_writer = cache_writer
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._metrics_topic = metrics_topic
        self._info_topic = info_topic
        self._clock = clock
        self._newest_event_time = 0.0

    def prepare(self, batch: Batch) -> PreparedBatch:
        """Decode and build the rows: CPU only, so it overlaps the previous batch's I/O."""
        decoded = decode_batch(
            batch.messages,
            metrics_topic=self._metrics_topic,
            info_topic=self._info_topic,
            now=self._clock(),
        )
        samples = [s for s in decoded.samples if not self._days.expired(s.ts)]
        return PreparedBatch(batch, decoded, samples, batch_rows(samples, decoded.infos))

    async def write(self, prepared: PreparedBatch) -> None:
        """Make the batch durable; raises, having changed nothing durable, when it cannot."""
        batch, decoded, samples = prepared.batch, prepared.decoded, prepared.samples
        started = time.perf_counter()
        await self._days.prepare({event_day(s.ts) for s in samples})
        try:
            result = await self._repository.write_batch(prepared.rows)
        except asyncpg.CheckViolationError:
            # "no partition of relation found for row": another writer dropped a day this one
            # had cached. Forget them all; the retry creates what is still within retention.
            self._days.reset()
            raise
        self._metrics.batch_latency.observe(time.perf_counter() - started)
        if decoded.rejected:
            await self._dead_letters.send(decoded.rejected)
            for _, letter in decoded.rejected:
                self._metrics.messages_rejected.labels(letter.reason).inc()
            log.warning(
                "messages sent to the dead-letter topic", extra={"count": len(decoded.rejected)}
            )

        self._metrics.batch_size.observe(len(batch.messages))
        self._metrics.rows_written.inc(result.rows_inserted)
        self._metrics.conflicts_skipped.inc(result.conflicts_skipped)
        self._metrics.samples_expired.inc(len(decoded.samples) - len(samples))
        self._metrics.tokens_created.inc(len(result.tokens_created))
        self._metrics.metadata_updates.inc(len(result.metadata_changed))
        if samples:
            # Redeliveries bring older samples back: the gauge only moves forward.
            newest = max(s.ts for s in samples).timestamp()
            if newest > self._newest_event_time:
                self._newest_event_time = newest
                self._metrics.newest_event_time.set(newest)
        log.debug(
            "batch written",
            extra={
                "messages": len(batch.messages),
                "rows": result.rows_inserted,
                "conflicts": result.conflicts_skipped,
            },
        )
        self._cache_writer.submit(
            CacheChange(
                metrics={s.cmc_id for s in samples},
                metadata=set(result.metadata_changed),
                tokens_added=bool(result.tokens_created),
            )
        )
