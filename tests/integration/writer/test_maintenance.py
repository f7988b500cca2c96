"""Partition maintenance on a real PostgreSQL: event-time retention across day boundaries,
partitions ahead, and drops running while batches are being written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from tokvel_common.db.pool import create_pool
from tokvel_common.events import MetricsSample
from writer.maintenance import PartitionDays, PartitionMaintainer, event_day
from writer.metrics import WriterMetrics
from writer.repository import WriterRepository, batch_rows

pytestmark = pytest.mark.integration

WALL_NOW = datetime(2025, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture
async def repository(database_url: str) -> AsyncIterator[WriterRepository]:
    pool = await create_pool(database_url, max_size=4)
    try:
        yield WriterRepository(pool)
    finally:
        await pool.close()


def _shifted(samples: list[MetricsSample], days: int) -> list[MetricsSample]:
    """The same real samples, ``days`` later in event time."""
    return [s.model_copy(update={"ts": s.ts + timedelta(days=days)}) for s in samples]


async def _partitions(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'token_metrics'::regclass ORDER BY 1"""
    )
    return [r["relname"] for r in rows]


async def _rows_per_day(db: asyncpg.Connection) -> dict[date, int]:
    rows = await db.fetch(
        """SELECT ("timestamp" AT TIME ZONE 'UTC')::date AS day, count(*) AS n
           FROM token_metrics GROUP BY 1"""
    )
    return {r["day"]: r["n"] for r in rows}


def _maintainer(
    repository: WriterRepository, days: PartitionDays, announced: list[date], retention: int
) -> PartitionMaintainer:
    async def announce(before: date) -> None:
        announced.append(before)

    return PartitionMaintainer(
        repository,
        days,
        WriterMetrics(CollectorRegistry()),
        retention_days=retention,
        ahead_days=1,
        interval_seconds=3600,
        lock_timeout_seconds=2.0,
        on_dropped=announce,
        clock=lambda: WALL_NOW,
    )


async def _write(
    repository: WriterRepository, days: PartitionDays, samples: list[MetricsSample]
) -> int:
    """What the writer does per batch: skip expired samples, create days, one transaction."""
    kept = [s for s in samples if not days.expired(s.ts)]
    await days.prepare({event_day(s.ts) for s in kept})
    return (await repository.write_batch(batch_rows(kept, []))).rows_inserted


async def test_retention_follows_event_time_across_day_boundaries(
    repository: WriterRepository, db: asyncpg.Connection, replay_slice: list[MetricsSample]
) -> None:
    # The slice runs from 2017-08-10 22:00 to 2017-08-11 01:55: it crosses midnight.
    days = PartitionDays(repository, WriterMetrics(CollectorRegistry()))
    announced: list[date] = []
    maintainer = _maintainer(repository, days, announced, retention=1)
    aug = {d: date(2017, 8, d) for d in range(10, 14)}
    per_day = {event_day(s.ts): 0 for s in replay_slice}
    for s in replay_slice:
        per_day[event_day(s.ts)] += 1

    await _write(repository, days, replay_slice)
    first = await maintainer.run_once()
    # Newest event day 08-11: the cutoff (08-10) keeps both days; wall clock never counts.
    assert (first.drop_before, first.dropped) == (aug[10], [])
    assert await _rows_per_day(db) == per_day
    assert await _partitions(db) == [
        "token_metrics_p20170810",
        "token_metrics_p20170811",
        "token_metrics_p20170812",  # one day ahead of the newest event day
        "token_metrics_p20251124",  # and of today, for live data
        "token_metrics_p20251125",
    ]

    # A day later in event time (08-11 22:00 -> 08-12 01:55): 08-10 falls out of retention.
    await _write(repository, days, _shifted(replay_slice, 1))
    second = await maintainer.run_once()
    assert (second.drop_before, second.dropped) == (aug[11], ["token_metrics_p20170810"])
    assert announced == [aug[11]]
    rows = await _rows_per_day(db)
    assert set(rows) == {aug[11], aug[12]}
    assert rows[aug[12]] == per_day[aug[11]]  # the shifted 00:00-01:55 part
    assert "token_metrics_p20170813" in await _partitions(db)
    assert "token_metrics_p20251124" in await _partitions(db)

    # A late sample for the dropped day is refused by the writer, not resurrected.
    late = replay_slice[0]
    assert days.expired(late.ts)
    assert await _write(repository, days, [late]) == 0
    assert "token_metrics_p20170810" not in await _partitions(db)


async def test_maintenance_is_safe_while_batches_are_written(
    repository: WriterRepository, db: asyncpg.Connection, replay_slice: list[MetricsSample]
) -> None:
    days = PartitionDays(repository, WriterMetrics(CollectorRegistry()))
    maintainer = _maintainer(repository, days, [], retention=2)
    writing_done = asyncio.Event()
    runs = 0

    async def write_six_days() -> int:
        written = 0
        try:
            for shift in range(6):
                samples = _shifted(replay_slice, shift)
                for start in range(0, len(samples), 500):
                    written += await _write(repository, days, samples[start : start + 500])
        finally:
            writing_done.set()
        return written

    async def maintain_meanwhile() -> None:
        nonlocal runs
        while not writing_done.is_set():
            await maintainer.run_once()
            runs += 1
            await asyncio.sleep(0.02)

    written, _ = await asyncio.gather(write_six_days(), maintain_meanwhile())
    final = await maintainer.run_once()
    assert runs > 5  # drops really interleaved with the batches
    assert written == 6 * len(replay_slice)  # no batch failed or skipped a sample
    newest = max(s.ts for s in _shifted(replay_slice, 5))
    assert final.drop_before == event_day(newest) - timedelta(days=2)
    rows = await _rows_per_day(db)
    assert min(rows) == final.drop_before  # everything older is gone, nothing newer lost
    expected_last_days = sum(
        1
        for shift in range(6)
        for s in _shifted(replay_slice, shift)
        if event_day(s.ts) >= final.drop_before
    )
    assert sum(rows.values()) == expected_last_days
