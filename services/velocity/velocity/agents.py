"""The velocity agent: batches of raw quotes applied to token states, results made durable.

A batch (``stream.noack_take``, whose parts :func:`coalesced` joins: Faust acks none of its
events) goes through two stages:

1. **apply** (in the agent, CPU only): each message, in offset order, is validated
   (rules.validate); an invalid one becomes a dead letter; a valid one whose (partition, offset)
   its token's state has already applied is a redelivery and is skipped; any other is applied
   to the token's state (rules.apply). The result is a :class:`_Job`: the records to publish
   and, once per token, its new state as bytes.
2. **deliver** (one background task, jobs in order): every record of the job is sent and its
   acknowledgement awaited; only then is each new token state written to the table and the
   acknowledgement of its changelog record awaited; only then are the batch's messages acked,
   so that an offset commit never covers a message whose results are not durable.

The delivery task's ack is the only one a message gets (``take_events`` would ack each event
when the agent asks for the next batch, which needed an ``incref`` per message to keep that ack
from being the final one). The two stages overlap: the agent applies (and Faust fills) the next
batch while the previous one waits for the broker. States applied but not yet written are kept
in an overlay that later batches read before the table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar, cast

import faust

from tokvel_common.events import DeadLetter
from tokvel_common.serialization import encode
from tokvel_common.velocity_math import AddOutcome, TokenWindows
from velocity.metrics import VelocityMetrics
from velocity.publish import Record, RecordPublisher
from velocity.rules import TOO_LATE, Rejection, apply, validate
from velocity.settings import VelocitySettings
from velocity.tables import StateTable, TokenState
from velocity.topics import VelocityTopics

log = logging.getLogger(__name__)

RawEvent = faust.EventT[bytes]
T = TypeVar("T")

PROCESSING_ERROR: Final = "processing_error"
_RETRY_FIRST_SECONDS: Final = 0.5
_RETRY_MAX_SECONDS: Final = 10.0
# Jobs waiting for the delivery task while it delivers one (and the agent applies another):
# with one, a backlog left the worker idle behind the broker's acks; three took
# bench/velocity_throughput.py from 0.46 to 0.50 of the bare Faust agent.
_QUEUED_JOBS: Final = 3


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Job:
    """One applied batch: what to publish, then what to store, then what to ack."""

    events: Sequence[RawEvent]
    records: list[Record] = field(default_factory=list)
    states: list[tuple[bytes, bytes, RawEvent]] = field(default_factory=list)
    samples: int = 0
    duplicates: int = 0
    redelivered: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


class BatchProcessor:
    """Applies batches of ``cmc.quotes.raw`` events and delivers their results (module doc)."""

    def __init__(
        self,
        *,
        app: faust.App,
        publisher: RecordPublisher,
        table: StateTable,
        topics: VelocityTopics,
        settings: VelocitySettings,
        metrics: VelocityMetrics,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._app = app
        self.publisher = publisher
        self._table = table
        self._topics = topics
        self._metrics = metrics
        self._clock = clock
        self._interval = settings.velocity_expected_interval_seconds
        self._future_skew = timedelta(seconds=settings.velocity_future_skew_seconds)
        # States applied by jobs not delivered yet, with the number of such jobs per token.
        self._overlay: dict[bytes, tuple[TokenState, int]] = {}
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue(_QUEUED_JOBS)
        self._delivery: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The delivery task, for as long as the agent runs.

        Cancelling it leaves the pending jobs' messages unacked: their offsets are not committed
        and they are processed again by whoever holds their partitions next.
        """
        self._delivery = asyncio.create_task(self._deliver_jobs(), name="velocity-delivery")
        try:
            yield
        finally:
            self._delivery.cancel()
            # wait() neither raises the task's CancelledError nor swallows one aimed at us.
            await asyncio.wait([self._delivery])
            self._delivery = None
            self._overlay.clear()
            while not self._jobs.empty():
                self._jobs.get_nowait()

    async def submit(self, events: Sequence[RawEvent]) -> None:
        """Apply ``events`` and queue their delivery (waits while the queue is full).

        Only the delivery task acks these messages. If anything here raises, the agent crashes,
        and with it the worker (app.py); the messages stay unacked, so uncommitted, and their
        partition's next owner processes them again.
        """
        if self._delivery is None:
            raise RuntimeError("submit() outside of running()")
        if self._delivery.done():
            raise RuntimeError("the delivery task stopped") from self._delivery.exception()
        await self._jobs.put(self.apply_batch(events))

    # ------------------------------------------------------------------ stage 1: apply

    def apply_batch(self, events: Sequence[RawEvent]) -> _Job:
        job = _Job(events)
        tokens: dict[bytes, tuple[TokenState, RawEvent]] = {}
        latest: dict[bytes, bytes] = {}
        now = self._clock()
        for event in events:
            self._apply_one(event, job, tokens, latest, now)
        # token.metrics.latest is compacted: of a token's samples in one batch only the newest
        # is kept, which during a catch-up saves most of its records.
        job.records.extend(
            (self._topics.metrics_latest, key, value, None) for key, value in latest.items()
        )
        for key, (state, last_event) in tokens.items():
            job.states.append((key, state.to_bytes(), last_event))
            jobs = self._overlay[key][1] if key in self._overlay else 0
            self._overlay[key] = (state, jobs + 1)
        return job

    def _apply_one(
        self,
        event: RawEvent,
        job: _Job,
        tokens: dict[bytes, tuple[TokenState, RawEvent]],
        latest: dict[bytes, bytes],
        now: datetime,
    ) -> None:
        message = event.message
        try:
            result = validate(message.key, message.value, future_skew=self._future_skew)
            if isinstance(result, Rejection):
                self._reject(job, message, result, now)
                return
            key = result.key
            state = tokens[key][0] if key in tokens else self._state(key, event)
            if state.has_applied(message.partition, message.offset):
                job.redelivered += 1
                return
            applied = apply(result, state.windows)
        except Exception as exc:
            # A bug must not stop the stream: the message goes to the DLQ with the error.
            log.exception(
                "quote failed", extra={"partition": message.partition, "offset": message.offset}
            )
            self._reject(job, message, Rejection(PROCESSING_ERROR, repr(exc)), now)
            return
        state.mark_applied(message.partition, message.offset)
        tokens[key] = (state, event)
        if applied.fields is not None:
            value = applied.encoded()
            job.records.append((self._topics.metrics, key, value, None))
            if applied.newest:
                latest[key] = value
            job.samples += 1
        elif applied.outcome is AddOutcome.TOO_LATE:
            detail = f"last_updated {result.ts.isoformat()} is more than 12 h behind the newest"
            self._reject(job, message, Rejection(TOO_LATE, detail), now)
        else:
            job.duplicates += 1

    def _state(self, key: bytes, event: RawEvent) -> TokenState:
        pending = self._overlay.get(key)
        if pending is not None:
            return pending[0]
        stored = self._table.read(key, event)
        if stored is None:
            return TokenState(TokenWindows(self._interval))
        return TokenState.from_bytes(stored, self._interval)

    def _reject(self, job: _Job, message: Any, rejection: Rejection, now: datetime) -> None:
        value: bytes | None = message.value
        letter = DeadLetter(
            reason=rejection.reason,
            detail=rejection.detail,
            raw=(value or b"").decode("utf-8", errors="replace"),
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            rejected_at=now,
        )
        job.records.append((self._topics.dead_letters, message.key, encode(letter), None))
        job.rejected[rejection.reason] = job.rejected.get(rejection.reason, 0) + 1

    # ------------------------------------------------------------------ stage 2: deliver

    async def _deliver_jobs(self) -> None:
        while True:
            job = await self._jobs.get()
            await self.deliver(job)

    async def deliver(self, job: _Job) -> None:
        """Make ``job`` durable (records, then states), then ack its messages."""
        await self._until_done("samples", lambda: self.publisher.publish(job.records))
        await self._until_done("state", lambda: self._write_states(job.states))
        for key, _, _ in job.states:
            state, jobs = self._overlay[key]
            if jobs == 1:
                del self._overlay[key]  # later batches read the table again
            else:
                self._overlay[key] = (state, jobs - 1)
        for event in job.events:
            event.ack()
        self._observe(job)

    async def _write_states(self, states: Sequence[tuple[bytes, bytes, RawEvent]]) -> None:
        changelog = [self._table.store(key, value, event) for key, value, event in states]
        self._table.persisted(await self.publisher.publish(changelog))

    async def _until_done(self, what: str, attempt: Callable[[], Awaitable[object]]) -> None:
        # A record sent twice is identical to the first: the consumers' dedupe absorbs it.
        delay = _RETRY_FIRST_SECONDS
        while True:
            try:
                await attempt()
            except Exception:
                log.warning("delivery failed, retrying", extra={"what": what}, exc_info=True)
                self._metrics.publish_retries.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
            else:
                return

    def _observe(self, job: _Job) -> None:
        metrics = self._metrics
        metrics.consumed.inc(len(job.events))
        metrics.emitted.inc(job.samples)
        metrics.duplicates.inc(job.duplicates)
        metrics.redelivered.inc(job.redelivered)
        for reason, count in job.rejected.items():
            metrics.rejected.labels(reason).inc(count)
        metrics.batch_seconds.observe(time.perf_counter() - job.started)
        last_offsets = {event.message.tp: event.message.offset for event in job.events}
        assigned = self._app.consumer.assignment()
        for tp, offset in last_offsets.items():
            # highwater() asserts the assignment, which a rebalance may have just changed.
            highwater = self._app.consumer.highwater(tp) if tp in assigned else None
            if highwater is not None:
                metrics.lag_messages.labels(str(tp.partition)).set(max(0, highwater - offset - 1))
        metrics.lag_seconds.set(time.time() - job.events[-1].message.timestamp)


def register_agents(
    app: faust.App, topics: VelocityTopics, processor: BatchProcessor, settings: VelocitySettings
) -> None:
    @app.agent(topics.raw, name="velocity")
    async def velocity(stream: faust.StreamT[bytes]) -> None:
        # noack_take is implemented by Stream but missing from the StreamT interface; it
        # yields the events themselves (typed as values), and leaves every ack to us. It
        # yields what arrived in each half idle period; coalesced() joins those into batches.
        idle = settings.velocity_batch_idle_seconds
        arrivals = cast(faust.Stream[bytes], stream).noack_take(
            settings.velocity_batch_size, within=idle / 2
        )
        batches = coalesced(
            cast(AsyncIterator[Sequence[RawEvent]], arrivals),
            max_size=settings.velocity_batch_size,
            within=settings.velocity_batch_within_seconds,
            idle=idle,
        )
        async with processor.running():
            async for events in batches:
                await processor.submit(events)


async def coalesced(
    parts: AsyncIterator[Sequence[T]], *, max_size: int, within: float, idle: float
) -> AsyncGenerator[list[T], None]:
    """The ``parts`` joined into batches of at most ``max_size`` items.

    A batch is closed when the next part would not fit, when ``within`` seconds have passed
    since its first part came, or when no part came for ``idle`` seconds. So on a backlog the
    batches are large (the cost of a batch is paid once per many quotes), and a live burst is
    applied ``idle`` seconds after it ends, however long ``within`` is.
    """
    loop = asyncio.get_running_loop()
    batch: list[T] = []
    deadline = 0.0
    # The next part is awaited in a task of its own: a timeout must not cancel the generator.
    following: asyncio.Task[Sequence[T]] | None = None
    try:
        while True:
            if following is None:
                following = asyncio.ensure_future(anext(parts))
            timeout = min(idle, deadline - loop.time()) if batch else None
            done, _ = await asyncio.wait(
                {following}, timeout=None if timeout is None else max(0.0, timeout)
            )
            if not done:  # quiet for `idle`, or the batch is old enough
                yield batch
                batch = []
                continue
            try:
                part = following.result()
            except StopAsyncIteration:
                break
            following = None
            if batch and len(batch) + len(part) > max_size:
                yield batch
                batch = []
            if not batch:
                deadline = loop.time() + within
            batch.extend(part)
            if len(batch) >= max_size or loop.time() >= deadline:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        if following is not None:
            following.cancel()
