"""An independent reference of the velocity processor's output, in plain Python.

It keeps every accepted sample of every token forever and applies ARCHITECTURE.md's rules
literally (no buckets, no TokenWindows): a window is the mean of the computable samples whose
event minute (hour for 7 d) lies within the window ending at the newest sample's minute
(hour), both edges included. Where the spec leaves a choice to the implementation, the choice
documented in velocity_math is restated here: samples more than 720 minutes behind the newest
are too late; the outlier test looks at the last 60 computable samples still within those 720
minutes, plus the last 3 older ones; the one-hour price is the closest within +-5 minutes,
unknown when that range reaches back more than 70 minutes before the newest sample.

Only the data-quality score itself comes from velocity_math.score_quality (unit-tested on
its own); its inputs are derived here.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tokvel_common.events import RawQuote
from tokvel_common.velocity_math import VelocityResult, score_quality

MS_MINUTE = 60_000
MS_HOUR = 3_600_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_MINUTES = {"1h": 60, "4h": 240, "12h": 720}
WINDOW_SECONDS = {"1h": 3_600, "4h": 14_400, "12h": 43_200, "7d": 604_800}
LATENESS_MINUTES = 720
OUTLIER_POINTS = 60
TAIL_POINTS = 3


def epoch_ms(ts: datetime) -> int:
    return (ts - EPOCH) // timedelta(milliseconds=1)


def velocity_of(volume: Any, market_cap: Any) -> tuple[float, str | None]:
    """(velocity, why not computable) by the seed's rule."""
    if volume is None:
        return 0.0, "volume_missing"
    if market_cap is None:
        return 0.0, "market_cap_missing"
    if market_cap <= 0:
        return 0.0, "market_cap_non_positive"
    return round(min(volume / market_cap, 100.0), 8), None


def trend_of(current: float | None, previous: list[float]) -> tuple[str, float | None]:
    if current is None or len(previous) < 3:
        return "insufficient_data", None
    average = math.fsum(previous[-3:]) / 3
    if average == 0:
        return ("stable" if current == 0 else "increasing"), average
    if (current - average) / average > 0.05:
        return "increasing", average
    if (average - current) / average > 0.05:
        return "decreasing", average
    return "stable", average


@dataclass
class _Token:
    """Every accepted sample of a token, kept forever, in event-time order (parallel lists)."""

    times: list[int] = field(default_factory=list)
    price_times: list[int] = field(default_factory=list)  # samples with a positive price
    prices: list[float] = field(default_factory=list)
    velocity_times: list[int] = field(default_factory=list)  # computable samples
    velocities: list[float] = field(default_factory=list)
    newest: int | None = None

    def velocities_from(self, start_ms: int, end_ms: int | None = None) -> list[float]:
        """Computable velocities with start_ms <= time (< end_ms), in event-time order."""
        first = bisect.bisect_left(self.velocity_times, start_ms)
        last = len(self.velocity_times) if end_ms is None else self._before(end_ms)
        return self.velocities[first:last]

    def _before(self, ms: int) -> int:
        return bisect.bisect_left(self.velocity_times, ms)


@dataclass(frozen=True)
class Expected:
    sample: dict[str, Any]  # the fields of the MetricsSample
    newest: bool


@dataclass
class Reference:
    expected_interval_seconds: int
    tokens: dict[int, _Token] = field(default_factory=dict)

    def feed(self, quote: RawQuote) -> Expected | str:
        """The sample this quote produces, or "duplicate" / "too_late"."""
        token = self.tokens.setdefault(quote.id, _Token())
        usd = quote.quote_in("USD")
        ts = quote.event_time()
        assert usd is not None and ts is not None
        ms = epoch_ms(ts)
        if token.newest is not None and (
            ms // MS_MINUTE < token.newest // MS_MINUTE - LATENESS_MINUTES
        ):
            return "too_late"
        index = bisect.bisect_left(token.times, ms)
        if index < len(token.times) and token.times[index] == ms:
            return "duplicate"
        token.times.insert(index, ms)
        newest = token.newest is None or ms > token.newest
        token.newest = ms if newest else token.newest
        velocity, flag = velocity_of(usd.volume_24h, usd.market_cap)
        if usd.price is not None and usd.price > 0:
            at = bisect.bisect_left(token.price_times, ms)
            token.price_times.insert(at, ms)
            token.prices.insert(at, float(usd.price))
        if flag is None:
            at = bisect.bisect_left(token.velocity_times, ms)
            token.velocity_times.insert(at, ms)
            token.velocities.insert(at, velocity)
        return Expected(self._sample(quote, token, ms, velocity, flag), newest)

    def _sample(
        self, quote: RawQuote, token: _Token, ms: int, velocity: float, flag: str | None
    ) -> dict[str, Any]:
        usd = quote.quote_in("USD")
        assert usd is not None and token.newest is not None
        newest = token.newest
        current = velocity if flag is None else None
        trend, recent_avg = trend_of(current, token.velocities_from(0, ms)[-3:])
        windows: dict[str, float | None] = {}
        coverage: dict[str, dict[str, int]] = {}
        # Every sample is at or before the newest: a window is everything from its first minute.
        for name, minutes in WINDOW_MINUTES.items():
            values = token.velocities_from((newest // MS_MINUTE - minutes) * MS_MINUTE)
            windows[name] = math.fsum(values) / len(values) if values else None
            coverage[name] = self._coverage(name, len(values))
        week = token.velocities_from((newest // MS_HOUR - 168) * MS_HOUR)
        windows["7d"] = math.fsum(week) / len(week) if week else None
        coverage["7d"] = self._coverage("7d", len(week))
        quality = score_quality(
            velocity=VelocityResult(velocity, flag is None, flag),
            price=usd.price,
            market_cap=usd.market_cap,
            volume_24h=usd.volume_24h,
            circulating_supply=quote.circulating_supply,
            percent_change_1h=usd.percent_change_1h,
            percent_change_24h=usd.percent_change_24h,
            percent_change_7d=usd.percent_change_7d,
            last_updated=quote.event_time() or quote.polled_at,
            reference_time=quote.listed_at or quote.polled_at,
            velocity_history=self._outlier_history(token, ms),
            price_one_hour_before=self._price_hour_before(token, ms),
        )
        return {
            "cmc_id": quote.id,
            "symbol": quote.symbol,
            "name": quote.name,
            "slug": quote.slug,
            "cmc_rank": quote.cmc_rank,
            "ts": quote.event_time(),
            "price_usd": usd.price,
            "market_cap_usd": usd.market_cap,
            "volume_24h_usd": usd.volume_24h,
            "circulating_supply": quote.circulating_supply,
            "total_supply": quote.total_supply,
            "max_supply": quote.max_supply,
            "percent_change_1h": usd.percent_change_1h,
            "percent_change_24h": usd.percent_change_24h,
            "percent_change_7d": usd.percent_change_7d,
            "velocity": velocity,
            "velocity_24h": velocity,
            "velocity_1h": windows["1h"],
            "velocity_4h": windows["4h"],
            "velocity_12h": windows["12h"],
            "velocity_7d": windows["7d"],
            "coverage": coverage,
            "trend": trend,
            "trend_recent_avg": recent_avg,
            "data_quality_score": quality.score,
            "quality_flags": quality.flags,
            "polled_at": quote.polled_at,
            "schema_version": 1,
        }

    def _coverage(self, window: str, used: int) -> dict[str, int]:
        expected = WINDOW_SECONDS[window] // self.expected_interval_seconds
        return {"points_used": used, "points_expected": expected}

    @staticmethod
    def _outlier_history(token: _Token, ms: int) -> list[float]:
        assert token.newest is not None
        horizon = (token.newest // MS_MINUTE - LATENESS_MINUTES) * MS_MINUTE
        history = token.velocities_from(horizon, ms)[-OUTLIER_POINTS:]
        missing = OUTLIER_POINTS - len(history)
        if missing > 0:
            older = token.velocities_from(0, horizon)[-TAIL_POINTS:]
            history = older[-missing:] + history
        return history

    @staticmethod
    def _price_hour_before(token: _Token, ms: int) -> float | None:
        assert token.newest is not None
        target = ms - MS_HOUR
        tolerance = 5 * MS_MINUTE
        if target - tolerance < token.newest - 70 * MS_MINUTE:
            return None
        first = bisect.bisect_left(token.price_times, target - tolerance)
        last = bisect.bisect_right(token.price_times, target + tolerance)
        candidates = [
            (abs(token.price_times[i] - target), token.price_times[i], token.prices[i])
            for i in range(first, last)
        ]
        return min(candidates)[2] if candidates else None  # the closest; ties: the earlier
