"""Partition maintenance planning: event-time retention, partitions ahead, contiguous runs."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from writer.maintenance import PartitionDays, contiguous_runs, plan_maintenance

WALL_NOW = datetime(2025, 11, 24, 12, 0, tzinfo=UTC)


def test_an_empty_table_gets_partitions_ahead_of_today_and_drops_nothing() -> None:
    plan = plan_maintenance(None, WALL_NOW, retention_days=90, ahead_days=7)
    assert plan.ensure == [(date(2025, 11, 24), 8)]
    assert plan.drop_before is None


def test_replayed_2017_data_is_kept_retention_counts_in_event_time() -> None:
    newest = datetime(2017, 8, 17, 23, 55, tzinfo=UTC)
    plan = plan_maintenance(newest, WALL_NOW, retention_days=90, ahead_days=7)
    assert plan.drop_before == date(2017, 5, 19)  # 90 days before the newest event day
    assert plan.ensure == [(date(2025, 11, 24), 8), (date(2017, 8, 17), 8)]


def test_the_cutoff_moves_with_event_time_across_a_day_boundary() -> None:
    before = plan_maintenance(
        datetime(2017, 8, 12, 23, 59, 59, tzinfo=UTC), WALL_NOW, retention_days=2, ahead_days=1
    )
    after = plan_maintenance(
        datetime(2017, 8, 13, 0, 0, 5, tzinfo=UTC), WALL_NOW, retention_days=2, ahead_days=1
    )
    assert (before.drop_before, after.drop_before) == (date(2017, 8, 10), date(2017, 8, 11))


def test_a_sample_from_the_future_cannot_drop_more_than_wall_time_would() -> None:
    glitch = datetime(2031, 1, 1, tzinfo=UTC)
    plan = plan_maintenance(glitch, WALL_NOW, retention_days=90, ahead_days=7)
    assert plan.drop_before == date(2025, 8, 26)


def test_contiguous_runs() -> None:
    days = [date(2017, 8, d) for d in (14, 10, 11, 12, 20, 11)]
    assert contiguous_runs(days) == [(date(2017, 8, 10), 3), (date(2017, 8, 14), 1),
                                     (date(2017, 8, 20), 1)]  # fmt: skip
    assert contiguous_runs([]) == []


def test_partition_days_refuse_samples_past_the_retention_floor() -> None:
    days = PartitionDays(repository=None, metrics=None)  # type: ignore[arg-type]  # pure part
    ts = datetime(2017, 8, 10, 23, 59, tzinfo=UTC)
    assert not days.expired(ts)
    days.forget_before(date(2017, 8, 11))
    assert days.expired(ts)
    days.forget_before(date(2017, 8, 1))  # an older cutoff never lowers the floor
    assert days.expired(ts) and not days.expired(ts + timedelta(minutes=1))
