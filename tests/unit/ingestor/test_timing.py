"""Schedule, backoff and reset arithmetic."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from ingestor.timing import (
    backoff_delay,
    missed_ticks,
    next_tick,
    next_utc_midnight,
    next_utc_month,
    until_next_window,
)


def test_ticks_follow_the_anchor_whatever_each_poll_took() -> None:
    anchor, interval = 100.0, 60.0
    # Polls that took 0.5 s, 59 s and 1 s each end before the next tick: no drift.
    assert next_tick(anchor, interval, 100.5) == 160.0
    assert next_tick(anchor, interval, 219.0) == 220.0
    assert next_tick(anchor, interval, 281.0) == 340.0


def test_a_poll_that_overran_skips_ticks_instead_of_stacking_them() -> None:
    anchor, interval = 0.0, 10.0
    now = 35.0  # the poll of tick 0 ended after ticks 10, 20 and 30 went by
    assert next_tick(anchor, interval, now) == 40.0
    assert missed_ticks(anchor, interval, 0.0, now) == 3
    assert missed_ticks(anchor, interval, 30.0, 31.0) == 0


def test_the_first_tick_is_the_anchor() -> None:
    assert next_tick(50.0, 5.0, 49.0) == 50.0


@pytest.mark.parametrize("attempt", range(8))
def test_backoff_is_jittered_below_an_exponential_cap(attempt: int) -> None:
    rng = random.Random(attempt)
    delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
    ceiling = min(30.0, 0.5 * 2**attempt)
    assert all(0.0 <= d <= ceiling for d in delays)
    assert max(delays) > ceiling * 0.8  # full jitter spreads over the whole range
    assert min(delays) < ceiling * 0.2


def test_minute_limit_waits_for_the_next_window_plus_a_little() -> None:
    rng = random.Random(1)
    wait = until_next_window(now=60 * 1000 + 45.5, window=60.0, rng=rng)  # :45.5 in a minute
    assert 14.5 <= wait <= 15.5
    small = until_next_window(now=10.25, window=2.0, rng=rng)
    assert 1.75 <= small <= 1.85  # jitter capped at 5 % of a short window


def test_daily_credits_reset_at_utc_midnight() -> None:
    now = datetime(2024, 2, 28, 23, 59, 59, tzinfo=UTC)
    assert next_utc_midnight(now) == datetime(2024, 2, 29, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "reset"),
    [
        (datetime(2024, 1, 31, 12, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)),
        (datetime(2024, 12, 15, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)),
    ],
)
def test_monthly_credits_reset_on_the_first_of_the_next_month(
    now: datetime, reset: datetime
) -> None:
    assert next_utc_month(now) == reset
