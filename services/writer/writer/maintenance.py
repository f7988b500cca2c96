"""Daily partitions of token_metrics: created ahead of the data, dropped past the retention.

Retention counts in **event time**, not wall time: the cutoff is ``writer_retention_days``
before the day of the newest sample in the table, so a replay of 2017 data keeps its 2017
partitions, and living through 90 days or replaying them in an hour drops the same ones. The
anchor is never later than today (wall clock), so a sample from the future (an upstream clock
glitch) cannot drop data that wall-clock retention would keep. A partition goes once its whole
day is before the cutoff: at least ``writer_retention_days`` full days stay.

Partitions are created ahead from both today and the newest event day, so live data never waits
for a partition and a replay has its next days ready; the write path also creates the days of
each batch it has not seen yet (:class:`PartitionDays`), so a late or replayed sample never
fails for want of one.

Concurrency: the SQL functions serialise creators and droppers with one advisory lock. Creating
or dropping a partition takes an ACCESS EXCLUSIVE lock on ``token_metrics``, so it waits for
running batches and later batches wait for it; ``writer_maintenance_lock_timeout_seconds``
bounds that wait (a run that times out is retried). Creation also locks ``tokens`` (the foreign
key), which batches lock before ``token_metrics``: creators take ``tokens`` first as well, so
the two never wait for each other in a cycle (the concurrency test found that deadlock).
Every instance runs maintenance; the functions are idempotent, and a drop is announced on the
invalidation channel so that every writer forgets the days it had cached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from writer.metrics import WriterMetrics
from writer.repository import WriterRepository

log = logging.getLogger(__name__)

RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class MaintenancePlan:
    ensure: list[tuple[date, int]]  # (first day, number of days)
    drop_before: date | None


def plan_maintenance(
    newest_event: datetime | None,
    now: datetime,
    *,
    retention_days: int,
    ahead_days: int,
) -> MaintenancePlan:
    today = now.astimezone(UTC).date()
    ensure = [(today, ahead_days + 1)]
    if newest_event is None:
        return MaintenancePlan(ensure, None)
    event_day = newest_event.astimezone(UTC).date()
    if event_day != today:
        ensure.append((event_day, ahead_days + 1))
    anchor = min(event_day, today)
    return MaintenancePlan(ensure, anchor - timedelta(days=retention_days))


def contiguous_runs(days: Iterable[date]) -> list[tuple[date, int]]:
    """``[(first_day, length), ...]`` covering exactly ``days``."""
    runs: list[tuple[date, int]] = []
    for day in sorted(set(days)):
        if runs and runs[-1][0] + timedelta(days=runs[-1][1]) == day:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((day, 1))
    return runs


def event_day(ts: datetime) -> date:
    return ts.astimezone(UTC).date()


def past_retention(ts: datetime, floor: date | None) -> bool:
    """Older than the retention floor: its partition is gone or about to go."""
    return floor is not None and event_day(ts) < floor


class PartitionDays:
    """The days known to have a partition, and the retention floor samples must not cross.

    In-process state of one writer: another instance's drop reaches it through
    :meth:`forget_before` (invalidation channel); a reset forgets everything it knew.
    """

    def __init__(self, repository: WriterRepository, metrics: WriterMetrics) -> None:
        self._repository = repository
        self._metrics = metrics
        self._known: set[date] = set()
        self.floor: date | None = None

    def expired(self, ts: datetime) -> bool:
        return past_retention(ts, self.floor)

    async def prepare(self, days: Iterable[date]) -> None:
        missing = set(days) - self._known
        for first_day, length in contiguous_runs(missing):
            created = await self._repository.ensure_partitions(first_day, length)
            self._metrics.partitions_created.inc(created)
        self._known |= missing

    def mark_known(self, first_day: date, length: int) -> None:
        self._known.update(first_day + timedelta(days=i) for i in range(length))

    def forget_before(self, cutoff: date) -> None:
        self.floor = cutoff if self.floor is None else max(self.floor, cutoff)
        self._known = {day for day in self._known if day >= cutoff}

    def reset(self) -> None:
        self._known.clear()


@dataclass(frozen=True)
class MaintenanceResult:
    created: int
    dropped: list[str]
    drop_before: date | None


class PartitionMaintainer:
    def __init__(
        self,
        repository: WriterRepository,
        days: PartitionDays,
        metrics: WriterMetrics,
        *,
        retention_days: int,
        ahead_days: int,
        interval_seconds: float,
        lock_timeout_seconds: float,
        on_dropped: Callable[[date], Awaitable[None]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._repository = repository
        self._days = days
        self._metrics = metrics
        self._retention_days = retention_days
        self._ahead_days = ahead_days
        self._interval_seconds = interval_seconds
        self._lock_timeout_seconds = lock_timeout_seconds
        self._on_dropped = on_dropped
        self._clock = clock

    async def run_once(self) -> MaintenanceResult:
        plan = plan_maintenance(
            await self._repository.newest_event_time(),
            self._clock(),
            retention_days=self._retention_days,
            ahead_days=self._ahead_days,
        )
        created = 0
        for first_day, length in plan.ensure:
            created += await self._repository.ensure_partitions(
                first_day, length, self._lock_timeout_seconds
            )
            self._days.mark_known(first_day, length)
        self._metrics.partitions_created.inc(created)
        dropped: list[str] = []
        if plan.drop_before is not None:
            self._days.forget_before(plan.drop_before)
            dropped = await self._repository.drop_partitions_before(
                plan.drop_before, self._lock_timeout_seconds
            )
            self._metrics.partitions_dropped.inc(len(dropped))
            if dropped:
                await self._on_dropped(plan.drop_before)
        if created or dropped:
            log.info(
                "partition maintenance",
                extra={
                    "partitions_created": created,
                    "partitions_dropped": dropped,
                    "drop_before": plan.drop_before,
                },
            )
        return MaintenanceResult(created, dropped, plan.drop_before)

    async def run(self) -> None:
        """Now, then every interval; a failed run (PostgreSQL down) is retried sooner."""
        while True:
            try:
                await self.run_once()
                delay = self._interval_seconds
            except Exception:
                log.warning("partition maintenance failed; will retry", exc_info=True)
                delay = min(self._interval_seconds, RETRY_SECONDS)
            await asyncio.sleep(delay)
