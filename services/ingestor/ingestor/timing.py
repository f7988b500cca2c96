"""Pure time arithmetic of the ingestor: the poll schedule, retry backoff and CMC's limit resets.

Nothing here sleeps or reads a clock: callers pass ``now`` in, so every rule is unit-tested.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta


def next_tick(anchor: float, interval: float, now: float) -> float:
    """The first tick of the fixed schedule ``anchor + k * interval`` strictly after ``now``.

    Ticks are computed from the anchor, never from the end of the previous poll, so the schedule
    does not drift; a poll that overran skips the ticks it covered instead of stacking them.
    """
    if now < anchor:
        return anchor
    return anchor + (math.floor((now - anchor) / interval) + 1) * interval


def missed_ticks(anchor: float, interval: float, tick: float, now: float) -> int:
    """How many ticks after ``tick`` went by while a poll ran (they are skipped, not run late)."""
    return max(0, math.floor((now - anchor) / interval) - round((tick - anchor) / interval))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**attempt)]``.

    Full jitter spreads the retries of many clients hit by the same outage (``attempt`` counts
    from 0 for the first retry).
    """
    return rng.uniform(0.0, min(cap, base * 2.0**attempt))


def until_next_window(now: float, window: float, rng: random.Random) -> float:
    """Seconds until the next rate-limit window opens, plus a little jitter.

    CMC resets its per-minute limit every wall-clock minute (``window`` = 60); the jitter, at most
    5 % of the window and never above a second, keeps replicas from hitting the boundary together.
    """
    remaining = window - (now % window)
    return remaining + rng.uniform(0.0, min(1.0, window * 0.05))


def next_utc_midnight(now: datetime) -> datetime:
    """When CMC's daily credit allowance resets (UTC midnight)."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=1)


def next_utc_month(now: datetime) -> datetime:
    """When CMC's monthly credit allowance resets (the first of the next month, UTC)."""
    now = now.astimezone(UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)
