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
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from writer.batcher import Batch, Batcher, Message, TopicPartitionKey
from writer.metrics import WriterMetrics

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# The longest poll while batches are in hand (see WriterLoop._poll_seconds).
PIPELINE_POLL_SECONDS = 0.01
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
class _Preparing(Generic[PreparedT]):
    task: asyncio.Task[PreparedT]  # the sink's prepare
    offsets: dict[TopicPartitionKey, int]


@dataclass
class _InFlight(Generic[PreparedT]):
    prepared: PreparedT
    offsets: dict[TopicPartitionKey, int]
    task: asyncio.Task[None]  # the sink's write


class WriterLoop(Generic[PreparedT]):
    """Polls, batches, and keeps PostgreSQL busy: while one batch is written, the next is
    prepared and the one after is polled.

    Writes and commits stay strictly in order (one write in flight, started only once the one
    before is durable), so offsets never pass an unwritten batch. A batch being prepared is
    not waited for while polling: the poll, the preparation and the write each run on their
    own (the writer's process, a worker process, PostgreSQL).
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
        prepare_depth: int = 1,
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
        # Batches handed to the sink's prepare, oldest first: at most prepare_depth of them.
        self._preparing: deque[_Preparing[PreparedT]] = deque()
        self._prepare_depth = prepare_depth
        self._in_flight: _InFlight[PreparedT] | None = None
        # Set when shutting down with a batch unwritten: no later batch may be committed.
        self._gave_up = False

    def request_stop(self) -> None:
        """Finish the batches in hand, write what is pending, commit, and return from run()."""
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

    def _poll_seconds(self) -> float:
        """How long a poll may wait: while batches are in hand, not past the moment the next
        step of theirs could start (a poll cannot be woken up by their progress)."""
        wait = min(self._batcher.seconds_until_due(), POLL_SECONDS)
        if self._preparing or self._in_flight is not None:
            wait = min(wait, PIPELINE_POLL_SECONDS)
        return wait

    async def run(self) -> None:
        try:
            while not self.stopping:
                await self._poll(self._poll_seconds())
                await self._advance(wait=False)
                if self._batcher.due():
                    if len(self._preparing) >= self._prepare_depth:
                        # As many batches in preparation as allowed: the next waits for a place.
                        await self._advance(wait=True)
                    batch = self._batcher.take()
                    task = asyncio.create_task(self._sink.prepare(batch), name="batch-prepare")
                    self._preparing.append(_Preparing(task, batch.offsets))
                    await self._advance(wait=False)
            # SIGTERM: the batches in hand, then what was read but not taken, then commit.
            while not self._gave_up and (self._preparing or self._in_flight is not None):
                await self._advance(wait=True)
            if len(self._batcher) and not self._gave_up:
                batch = self._batcher.take()
                await self._write_until_durable(await self._sink.prepare(batch), batch.offsets)
        finally:
            tasks: list[asyncio.Task[Any]] = []
            if self._in_flight is not None:
                tasks.append(self._in_flight.task)
            tasks.extend(p.task for p in self._preparing)
            for task in tasks:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _advance(self, *, wait: bool) -> None:
        """Move the batches in hand on: the write in flight settled, the oldest prepared batch
        into PostgreSQL. ``wait``: until the oldest batch in preparation is in PostgreSQL (or,
        with none being prepared, the write in flight settled).

        The next write starts before the offsets of the one before are committed: those rows
        are durable already, and the commit's round trip need not keep PostgreSQL idle.
        """
        flight = self._in_flight
        preparing = self._preparing[0] if self._preparing else None
        if wait and flight is not None:
            await asyncio.wait([flight.task])
        durable: dict[TopicPartitionKey, int] | None = None
        if flight is not None and flight.task.done():
            self._in_flight = None
            exc = flight.task.exception()
            if exc is None:
                durable = flight.offsets
            elif not isinstance(exc, Exception):
                raise exc
            else:
                self._failed(exc)
                log.warning("batch not written; consumption paused, retrying", exc_info=exc)
                await self._write_until_durable(flight.prepared, flight.offsets, failed_once=True)
        if self._gave_up:
            return
        if self._in_flight is None and preparing is not None and (wait or preparing.task.done()):
            self._preparing.popleft()
            prepared = await preparing.task
            task = asyncio.create_task(self._sink.write(prepared), name="batch-write")
            self._in_flight = _InFlight(prepared, preparing.offsets, task)
        if durable is not None:
            await self._durable(durable)

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
                    log.error(
                        "shutting down with an unwritten batch; its offsets and those of the "
                        "batches after it stay uncommitted"
                    )
                    self._gave_up = True
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
