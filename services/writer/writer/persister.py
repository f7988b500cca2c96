"""One batch made durable: decode, partitions, one PostgreSQL transaction, dead letters.

:meth:`BatchPersister.prepare` does the CPU work (decoding, exact numbers: :func:`prepare_batch`)
in a worker process, :meth:`write` the I/O in this one. The consumer loop commits the batch's
offsets only after ``write`` returns. Any exception means nothing of the batch may be considered
done: the loop pauses and writes the same batch again, which is harmless because every write is
idempotent.

Why a worker process: decoding and validating a sample costs about as much CPU as everything
else the writer does with it (fetching, COPY, cache), and Python runs one thread at a time.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, date, datetime

import asyncpg
from aiokafka import AIOKafkaProducer

from tokvel_common.cache import CacheChange
from tokvel_common.events import DeadLetter
from tokvel_common.serialization import encode
from writer.batcher import Batch, MessageFields, decode_batch
from writer.cache_writer import CacheWriter
from writer.maintenance import PartitionDays, event_day, past_retention
from writer.metrics import WriterMetrics
from writer.repository import BatchRows, WriterRepository, batch_rows

log = logging.getLogger(__name__)

PARENT_CHECK_SECONDS = 1.0


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
    """A batch decoded into its rows, and what the writer reports about it."""

    messages: int
    rows: BatchRows  # of the samples within the retention
    rejected: list[tuple[bytes | None, DeadLetter]]  # (key, letter)
    days: set[date]  # the event days of the rows: their partitions
    newest_event_time: datetime | None
    expired: int  # samples past the retention floor, not written


def prepare_batch(
    messages: Sequence[MessageFields],
    *,
    metrics_topic: str,
    info_topic: str,
    now: datetime,
    retention_floor: date | None,
) -> PreparedBatch:
    """Decode and build the rows: CPU only, no state (it runs in a worker process).

    The messages come as plain tuples of their fields: pickled to the worker at half the cost.
    """
    decoded = decode_batch(messages, metrics_topic=metrics_topic, info_topic=info_topic, now=now)
    samples = [s for s in decoded.samples if not past_retention(s.ts, retention_floor)]
    times = {s.ts for s in samples}  # a poll's samples share theirs
    return PreparedBatch(
        messages=len(messages),
        rows=batch_rows(samples, decoded.infos),
        rejected=decoded.rejected,
        days={event_day(ts) for ts in times},
        newest_event_time=max(times, default=None),
        expired=len(decoded.samples) - len(samples),
    )


def start_worker(parent: int) -> None:
    """Initializer of a worker process.

    Signals are for the writer's process, which finishes its batches and then shuts the workers
    down; a writer killed outright cannot, so a worker leaves when its parent is gone.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc.freeze()  # as in the writer's process (app.run)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


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
        workers: Executor | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._repository = repository
        self._workers = workers
        self._days = days
        self._cache_writer = cache_writer
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._metrics_topic = metrics_topic
        self._info_topic = info_topic
        self._clock = clock
        self._newest_event_time = 0.0

    async def prepare(self, batch: Batch) -> PreparedBatch:
        """The batch's rows, built by a worker process (by this one without workers)."""
        work = functools.partial(
            prepare_batch,
            [(m.topic, m.partition, m.offset, m.key, m.value) for m in batch.messages],
            metrics_topic=self._metrics_topic,
            info_topic=self._info_topic,
            now=self._clock(),
            retention_floor=self._days.floor,
        )
        if self._workers is None:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._workers, work)

    async def write(self, prepared: PreparedBatch) -> None:
        """Make the batch durable; raises, having changed nothing durable, when it cannot."""
        started = time.perf_counter()
        await self._days.prepare(prepared.days)
        try:
            result = await self._repository.write_batch(prepared.rows)
        except asyncpg.CheckViolationError:
            # "no partition of relation found for row": another writer dropped a day this one
            # had cached. Forget them all; the retry creates what is still within retention.
            self._days.reset()
            raise
        self._metrics.batch_latency.observe(time.perf_counter() - started)
        if prepared.rejected:
            await self._dead_letters.send(prepared.rejected)
            for _, letter in prepared.rejected:
                self._metrics.messages_rejected.labels(letter.reason).inc()
            log.warning(
                "messages sent to the dead-letter topic", extra={"count": len(prepared.rejected)}
            )

        self._metrics.batch_size.observe(prepared.messages)
        self._metrics.rows_written.inc(result.rows_inserted)
        self._metrics.conflicts_skipped.inc(result.conflicts_skipped)
        self._metrics.samples_expired.inc(prepared.expired)
        self._metrics.tokens_created.inc(len(result.tokens_created))
        self._metrics.metadata_updates.inc(len(result.metadata_changed))
        if prepared.newest_event_time is not None:
            # Redeliveries bring older samples back: the gauge only moves forward.
            newest = prepared.newest_event_time.timestamp()
            if newest > self._newest_event_time:
                self._newest_event_time = newest
                self._metrics.newest_event_time.set(newest)
        log.debug(
            "batch written",
            extra={
                "messages": prepared.messages,
                "rows": result.rows_inserted,
                "conflicts": result.conflicts_skipped,
            },
        )
        self._cache_writer.submit(
            CacheChange(
                metrics=set(prepared.rows.token_cmc_ids),
                metadata=set(result.metadata_changed),
                tokens_added=bool(result.tokens_created),
            )
        )
