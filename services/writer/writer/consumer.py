"""The Kafka side: poll into batches, make each durable, then commit its offsets.

Offsets are committed only after the batch's PostgreSQL transaction committed, so a crash at any
point re-reads at most the batches in flight, and their rows are skipped by ON CONFLICT.

When a batch cannot be written (PostgreSQL down, say) the loop pauses every assigned partition
and keeps polling (which fetches nothing while paused) so that the consumer stays in its group,
then retries the same batch with a growing pause (up to ``retry_max_seconds``). Nothing is
committed meanwhile; when the write succeeds the partitions resume by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from writer.batcher import Batch, Batcher, Message, TopicPartitionKey
from writer.metrics import WriterMetrics

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
INITIAL_RETRY_SECONDS = 0.1


def to_messages(records: dict[Any, list[Any]]) -> list[Message]:
    return [
        Message(r.topic, r.partition, r.offset, r.key, r.value)
        for partition_records in records.values()
        for r in partition_records
    ]


class WriterRebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Forgets the pending messages of revoked partitions (their next owner re-reads them)."""

    def __init__(self, batcher: Batcher, metrics: WriterMetrics) -> None:
        self._batcher = batcher
        self._metrics = metrics
        self.joined = asyncio.Event()

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in revoked]
        dropped = self._batcher.discard(keys)
        for topic, partition in keys:
            with contextlib.suppress(KeyError):  # no lag reported for it yet
                self._metrics.consumer_lag.remove(topic, str(partition))
        if dropped:
            log.info(
                "partitions revoked; pending messages left to their next owner",
                extra={"messages": dropped},
            )

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": sorted(map(str, assigned))})
        self.joined.set()


PreparedT = TypeVar("PreparedT")


class BatchSink(Protocol[PreparedT]):
    """What the loop hands batches to: CPU work first, then the I/O that makes them durable."""

    async def prepare(self, batch: Batch) -> PreparedT: ...

    async def write(self, prepared: PreparedT) -> None: ...


@dataclass
class _InFlight(Generic[PreparedT]):
    prepared: PreparedT
    offsets: dict[TopicPartitionKey, int]
    task: asyncio.Task[None]


class WriterLoop(Generic[PreparedT]):
    """Polls, batches, and keeps one batch in PostgreSQL while it prepares the next.

    The next batch's decoding overlaps the current one's transaction; writes and commits stay
    strictly in order (one write in flight), so offsets never pass an unwritten batch.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        batcher: Batcher,
        sink: BatchSink[PreparedT],
        metrics: WriterMetrics,
        *,
        retry_max_seconds: float,
        shutdown_timeout_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._batcher = batcher
        self._sink = sink
        self._metrics = metrics
        self._retry_max_seconds = retry_max_seconds
        self._shutdown_timeout_seconds = shutdown_timeout_seconds
        self._clock = clock
        self._stop_requested_at: float | None = None

    def request_stop(self) -> None:
        """Finish the batch in hand, write what is pending, commit, and return from run()."""
        if self._stop_requested_at is None:
            self._stop_requested_at = self._clock()
            log.info("stop requested")

    @property
    def stopping(self) -> bool:
        return self._stop_requested_at is not None

    def _give_up(self) -> bool:
        """True once stopping and the shutdown grace period has run out."""
        return (
            self._stop_requested_at is not None
            and self._clock() - self._stop_requested_at >= self._shutdown_timeout_seconds
        )

    async def _poll(self, wait_seconds: float) -> None:
        records = await self._consumer.getmany(
            timeout_ms=int(wait_seconds * 1000), max_records=self._batcher.room()
        )
        self._batcher.add(to_messages(records))
        for tp, partition_records in records.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None and partition_records:
                lag = max(0, highwater - partition_records[-1].offset - 1)
                self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)

    async def run(self) -> None:
        in_flight: _InFlight[PreparedT] | None = None
        try:
            while not self.stopping:
                await self._poll(min(self._batcher.seconds_until_due(), POLL_SECONDS))
                if in_flight is not None and in_flight.task.done():
                    await self._settle(in_flight)
                    in_flight = None
                if self._batcher.due():
                    batch = self._batcher.take()
                    prepared = await self._sink.prepare(batch)
                    if in_flight is not None:
                        await self._settle(in_flight)
                    task = asyncio.create_task(self._sink.write(prepared), name="batch-write")
                    in_flight = _InFlight(prepared, batch.offsets, task)
            # SIGTERM: the batch in flight, then what was read but not written, then commit.
            if in_flight is not None:
                await self._settle(in_flight)
                in_flight = None
            if len(self._batcher):
                batch = self._batcher.take()
                await self._write_until_durable(await self._sink.prepare(batch), batch.offsets)
        finally:
            if in_flight is not None and not in_flight.task.done():
                in_flight.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await in_flight.task

    async def _settle(self, flight: _InFlight[PreparedT]) -> None:
        """Wait for the write in flight: commit it, or retry it (paused) until it is durable."""
        try:
            await flight.task
        except Exception as exc:
            self._failed(exc)
            log.warning("batch not written; consumption paused, retrying", exc_info=True)
            await self._write_until_durable(flight.prepared, flight.offsets, failed_once=True)
            return
        await self._durable(flight.offsets)

    async def _write_until_durable(
        self,
        prepared: PreparedT,
        offsets: dict[TopicPartitionKey, int],
        *,
        failed_once: bool = False,
    ) -> None:
        delay = INITIAL_RETRY_SECONDS
        while True:
            if failed_once:
                if self._give_up():
                    log.error("shutting down with an unwritten batch; its offsets stay uncommitted")
                    return
                await self._wait_paused(delay)
                delay = min(delay * 2, self._retry_max_seconds)
            try:
                await self._sink.write(prepared)
                break
            except Exception as exc:
                self._failed(exc)
                log.warning("batch not written; consumption paused, retrying", exc_info=True)
                failed_once = True
        await self._durable(offsets)

    def _failed(self, exc: Exception) -> None:
        self._metrics.batch_failures.labels(type(exc).__name__).inc()
        self._metrics.postgres_up.set(0)

    async def _durable(self, offsets: dict[TopicPartitionKey, int]) -> None:
        self._metrics.postgres_up.set(1)
        paused = self._consumer.paused()
        if paused:
            self._consumer.resume(*paused)
            log.info("batch written after retries; consumption resumed")
        await self._commit(offsets)

    async def _wait_paused(self, seconds: float) -> None:
        """Wait with every partition paused, polling so that the group keeps this member."""
        deadline = self._clock() + seconds
        while (remaining := deadline - self._clock()) > 0 and not self._give_up():
            # Re-pause each time: a rebalance meanwhile may have assigned new partitions.
            assignment = self._consumer.assignment()
            if assignment:
                self._consumer.pause(*assignment)
            await self._poll(min(remaining, POLL_SECONDS))

    async def _commit(self, offsets: dict[TopicPartitionKey, int]) -> None:
        assigned = self._consumer.assignment()
        to_commit = {
            tp: offset
            for (topic, partition), offset in offsets.items()
            if (tp := TopicPartition(topic, partition)) in assigned
        }
        if not to_commit:
            return
        try:
            await self._consumer.commit(to_commit)
        except (CommitFailedError, IllegalStateError, KafkaError):
            # The rows are durable; whoever owns the partitions next re-reads them, a no-op.
            self._metrics.commit_failures.inc()
            log.warning("offset commit failed after a durable batch", exc_info=True)
