"""The velocity math of ARCHITECTURE.md "The numbers": pure functions and one state class, no I/O.

Everything here is deterministic and depends on **event time** only (a quote's ``last_updated``),
so replaying recorded data produces the same numbers as living through it.

Public API
----------
- :func:`compute_velocity` - ``volume_24h / market_cap``, capped at 100, rounded to 8 decimals.
- :func:`compute_trend` - the fixed trend rule over the previous computable velocities.
- :class:`TokenWindows` - one token's rolling state: dedupe, 1h/4h/12h/7d means with coverage,
  trend and outlier history, recent prices; compact binary (de)serialization for a Faust table.
- :func:`score_quality` - the data-quality score in [0, 1] with its flags and components.

Decisions (beyond the spec's text)
----------------------------------
Velocity
  * Inputs are JSON numbers as received (``int`` of any size or ``float``). The ratio is Python's
    ``volume / market_cap`` (int/int true division is correctly rounded); only when an ``int``
    lies beyond the float range (the division raises ``OverflowError``) is it decided with exact
    rationals (:class:`fractions.Fraction`), so no real value overflows.
  * Not computable -> ``velocity = 0.0`` and one flag, the first failing check in this order:
    ``volume_missing``, ``market_cap_missing``, ``market_cap_not_finite``, ``volume_not_finite``
    (NaN/inf cannot come from JSON, but a float can carry them), ``market_cap_non_positive``,
    ``volume_negative``. A volume of 0 is computable (velocity 0.0).

Trend
  * ``recent_avg = fsum(last 3) / 3``; the relative changes are computed in binary floating point
    exactly as the spec writes them, with a strict ``> 0.05``. A change that is exactly 5 % in
    floating point (e.g. average 20.0 and current 21.0 or 19.0) is ``stable``; note that decimal
    "1.05 vs 1.0" is *not* exactly 5 % in binary (1.05 is stored as 1.0500000000000000444) and is
    ``increasing``.
  * ``recent_avg`` is ``None`` whenever the trend is ``insufficient_data``.

Windows (:class:`TokenWindows`)
  * Edges are inclusive at both ends: a sample whose event minute is exactly 60/240/720 minutes
    before the newest sample's minute is in the 1h/4h/12h window; one whose event hour is exactly
    168 hours before the newest hour is in the 7d window. (So at an exact cadence ``points_used``
    can be ``points_expected + 1``, since ``points_expected = window_seconds // interval``.)
  * Allowed lateness: a sample whose event minute is more than 720 minutes before the newest
    sample's minute is rejected as ``too_late`` (state unchanged). Every accepted sample is
    therefore still in the 12 h store, which makes dedupe exact with bounded memory.
  * Dedupe: samples with the same ``last_updated`` (to the millisecond, CMC's precision; finer
    digits are floored) count once: the first one wins, later ones are ``duplicate``.
  * Memory layout (per token, about 12 KiB at a 1-minute cadence): computable samples of the
    last 12 h as two sorted parallel ``array`` columns (int32 millisecond offsets from a per-token
    base, float64 velocity); non-computable samples as timestamps only (they serve dedupe);
    prices only for the last 70 minutes (the percent-change cross-check needs the price about
    one hour back, keeping 12 h of prices would cost another 5.6 KiB); per-hour sums for the 7 d
    window in a ring of 169 hours (int64 sum in units of 1e-8, uint32 count).
  * Sums: 1h/4h/12h means are ``math.fsum`` over the stored velocities divided by the count -
    the correctly rounded sum, so the result does not depend on arrival order. The 7 d window
    sums velocities as exact integers in units of 10^-8 (velocities are rounded to 8 decimals, so
    this is exact; a velocity off that grid is rounded to it, an error below 5e-9): samples move
    from the 12 h store into their hour bucket when they leave the store, and the mean is one
    correctly rounded integer division - exact and independent of arrival order.
  * Trend history: the previous computable samples are those of the 12 h store plus the last 3
    computable samples that left it, so the trend is exact even across a gap longer than 12 h.
  * Price look-up (:meth:`TokenWindows.price_near`): the closest price within the tolerance, ties
    to the earlier one; None when the range reaches back beyond the 70 kept minutes (e.g. for a
    sample more than 5 minutes late), so the answer depends only on the accepted samples.
  * Accepted velocities must be finite and within [0, 100] (what :func:`compute_velocity`
    produces); anything else raises ``ValueError``.

Quality (:func:`score_quality`)
  * score = round(0.30 completeness + 0.30 cross_validation + 0.20 outlier + 0.20 freshness, 2)
    (Python's ``round``: correctly rounded, ties to even), clamped to [0, 1].
  * completeness: present fraction of price, market_cap, volume_24h, circulating_supply,
    percent_change_1h/24h/7d; each missing one is flagged ``<name>_missing`` (``volume_missing``
    for volume_24h, the same flag :func:`compute_velocity` uses).
  * cross_validation: mean of the checks that can run (1.0 when none can: absence is already
    counted by completeness). ``market_cap_mismatch``: market cap vs price x circulating supply
    differ by more than 2 % of the larger (on the recorded 5-minute week 0.04 % of samples).
    ``percent_change_mismatch``: reported percent_change_1h differs by more than 5 percentage
    points from the change against the token's own price closest to one hour earlier (within
    +-5 minutes; on the recorded week a 2-point tolerance flags 4 % of samples, 5 points 0.7 %).
  * outlier: robust z-score of the current velocity against >= 5 previous computable velocities
    (callers pass :data:`OUTLIER_HISTORY_POINTS` of them): ``z = 0.6745 (x - median) / MAD``;
    when MAD is 0 the mean absolute deviation is used (``z = (x - median) / (1.253314 MeanAD)``);
    when both are 0 (constant history) any different value has an infinite z. ``|z| > 3.5`` ->
    0.0 and ``velocity_outlier``. Not computable, or < 5 points -> neutral 1.0.
  * freshness: age = reference_time - last_updated; 1.0 up to 10 minutes, linearly down to 0.0
    at 24 hours; flag ``stale`` when below 1.0. A timestamp more than 2 minutes in the future is
    0.0 and ``future_timestamp`` (within 2 minutes it is clock skew and counts as fresh).
  * The not-computable flag of the velocity is included; flags are unique, in a fixed order.
"""

from __future__ import annotations

import bisect
import math
import operator
import statistics
import struct
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from fractions import Fraction
from itertools import repeat
from typing import Final, NamedTuple

from tokvel_common.events import Number, Trend, WindowName

# --------------------------------------------------------------------------------------- velocity

VELOCITY_CAP: Final = 100.0
VELOCITY_DECIMALS: Final = 8


@dataclass(frozen=True, slots=True)
class VelocityResult:
    velocity: float  # 0.0 when not computable (the seed's rule)
    computable: bool
    flag: str | None  # why it is not computable; None when it is

    @property
    def computable_velocity(self) -> float | None:
        """The velocity for windows and trend history, or None when it must enter neither."""
        return self.velocity if self.computable else None


def _is_finite(value: Number) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _capped_ratio(volume: Number, market_cap: Number) -> float:
    try:
        ratio = volume / market_cap
    except OverflowError:
        # An int beyond the float range (> ~1.8e308): decide exactly with rationals.
        exact = Fraction(volume) / Fraction(market_cap)
        return VELOCITY_CAP if exact > VELOCITY_CAP else float(exact)
    return min(ratio, VELOCITY_CAP)


def compute_velocity(volume_24h: Number | None, market_cap: Number | None) -> VelocityResult:
    """Velocity = volume / market cap, capped at 100.0 and rounded to 8 decimals."""
    flag: str | None = None
    if volume_24h is None:
        flag = "volume_missing"
    elif market_cap is None:
        flag = "market_cap_missing"
    elif not _is_finite(market_cap):
        flag = "market_cap_not_finite"
    elif not _is_finite(volume_24h):
        flag = "volume_not_finite"
    elif market_cap <= 0:
        flag = "market_cap_non_positive"
    elif volume_24h < 0:
        flag = "volume_negative"
    if flag is not None or volume_24h is None or market_cap is None:
        return VelocityResult(velocity=0.0, computable=False, flag=flag)
    velocity = round(_capped_ratio(volume_24h, market_cap), VELOCITY_DECIMALS)
    return VelocityResult(velocity=velocity, computable=True, flag=None)


# ------------------------------------------------------------------------------------------ trend

TREND_POINTS: Final = 3
TREND_THRESHOLD: Final = 0.05


class TrendResult(NamedTuple):
    trend: Trend
    recent_avg: float | None


def compute_trend(current: float | None, previous: Sequence[float]) -> TrendResult:
    """The trend of ``current`` against the mean of the last 3 of ``previous`` (event-time order).

    ``current`` is None when the sample is not computable; ``previous`` holds only computable
    velocities and excludes the current sample.
    """
    if current is None or len(previous) < TREND_POINTS:
        return TrendResult("insufficient_data", None)
    recent_avg = math.fsum(previous[-TREND_POINTS:]) / TREND_POINTS
    if recent_avg == 0:
        return TrendResult("stable" if current == 0 else "increasing", recent_avg)
    if (current - recent_avg) / recent_avg > TREND_THRESHOLD:
        return TrendResult("increasing", recent_avg)
    if (recent_avg - current) / recent_avg > TREND_THRESHOLD:
        return TrendResult("decreasing", recent_avg)
    return TrendResult("stable", recent_avg)


# ---------------------------------------------------------------------------------------- windows

WINDOW_MINUTES: Final[Mapping[WindowName, int]] = {"1h": 60, "4h": 240, "12h": 720}
WINDOW_7D_HOURS: Final = 168
WINDOW_SECONDS: Final[Mapping[WindowName, int]] = {
    "1h": 3_600,
    "4h": 14_400,
    "12h": 43_200,
    "7d": 604_800,
}
ALLOWED_LATENESS_MINUTES: Final = 720
PRICE_RETENTION_MINUTES: Final = 70  # the 1 h look-back, its +-5 min tolerance, and slack
PERCENT_CHANGE_LOOKBACK: Final = timedelta(hours=1)
PRICE_MATCH_TOLERANCE: Final = timedelta(minutes=5)
DEFAULT_EXPECTED_INTERVAL_SECONDS: Final = 60
OUTLIER_HISTORY_POINTS: Final = 60

_MS_PER_MINUTE: Final = 60_000
_MS_PER_HOUR: Final = 3_600_000
_PRICE_RETENTION_MS: Final = PRICE_RETENTION_MINUTES * _MS_PER_MINUTE
_UNITS_PER_VELOCITY: Final = 10**VELOCITY_DECIMALS
_HOUR_SLOTS: Final = WINDOW_7D_HOURS + 1  # both edges inclusive: 169 distinct hours
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


def _typecode(candidates: str, itemsize: int) -> str:
    """The first array typecode with the wanted item size (C int sizes vary by platform)."""
    return next(code for code in candidates if array(code).itemsize == itemsize)


_INT32: Final = _typecode("ilh", 4)
_UINT32: Final = _typecode("ILH", 4)
_INT32_MAX: Final = 2**31 - 1


def _epoch_ms(ts: datetime) -> int:
    """Milliseconds since the epoch, floored; a naive datetime is read as UTC (like events.py)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - _EPOCH) // _ONE_MS


def _from_epoch_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _velocity_units(velocity: float) -> int:
    # Exact for 8-decimal velocities <= 100: v * 1e8 is within 1e-5 of an integer.
    return round(velocity * _UNITS_PER_VELOCITY)


def _positive_finite_float(value: Number | None) -> float | None:
    """``value`` as a float when it is a usable price (finite, > 0), else None."""
    if value is None:
        return None
    try:
        as_float = float(value)
    except OverflowError:
        return None
    return as_float if math.isfinite(as_float) and as_float > 0 else None


class AddOutcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # same last_updated as a sample already counted: state unchanged
    TOO_LATE = "too_late"  # more than 720 minutes before the newest minute: state unchanged


class Coverage(NamedTuple):
    points_used: int  # computable samples in the window
    points_expected: int  # window_seconds // expected_interval_seconds


@dataclass(frozen=True, slots=True)
class RollingVelocities:
    """The windows ending at the newest sample; a window with no computable sample is None."""

    velocity_1h: float | None
    velocity_4h: float | None
    velocity_12h: float | None
    velocity_7d: float | None
    coverage: Mapping[WindowName, Coverage]


# magic, version, flags, newest ms, base ms, 12 h store units, lengths of the columns.
_HEADER: Final = struct.Struct("<4sBBqqqIIIB")
_MAGIC: Final = b"TKVW"
_FORMAT_VERSION: Final = 1
_HAS_NEWEST: Final = 1
_HAS_HOURS: Final = 2


def _little_endian(column: array[int] | array[float]) -> bytes:
    if sys.byteorder == "little":
        return column.tobytes()
    swapped = array(column.typecode, column)
    swapped.byteswap()
    return swapped.tobytes()


class _Reader:
    """Reads consecutive little-endian array columns out of a serialized state."""

    def __init__(self, data: bytes, offset: int) -> None:
        self._data = memoryview(data)
        self._offset = offset

    def ints(self, typecode: str, count: int) -> array[int]:
        column: array[int] = array(typecode)
        self._fill(column, count)
        return column

    def floats(self, count: int) -> array[float]:
        column: array[float] = array("d")
        self._fill(column, count)
        return column

    def _fill(self, column: array[int] | array[float], count: int) -> None:
        size = column.itemsize * count
        chunk = self._data[self._offset : self._offset + size]
        if len(chunk) != size:
            raise ValueError("truncated TokenWindows state")
        column.frombytes(chunk)
        if sys.byteorder != "little":
            column.byteswap()
        self._offset += size

    def finish(self) -> None:
        if self._offset != len(self._data):
            raise ValueError("trailing bytes after TokenWindows state")


class TokenWindows:
    """One token's rolling velocity state, bounded in memory, exact per ARCHITECTURE.md.

    Feed every sample with :meth:`add` (any order); read :meth:`windows` (anchored at the newest
    sample), :meth:`previous_computable` (trend and outlier history) and :meth:`price_near`.
    """

    __slots__ = (
        "_base_ms",
        "_hour_count_total",
        "_hour_counts",
        "_hour_units",
        "_hour_units_total",
        "_newest_ms",
        "_non_computable_ts",
        "_price",
        "_price_ts",
        "_store_units",
        "_tail_ts",
        "_tail_velocity",
        "_velocity",
        "_velocity_ts",
        "expected_interval_seconds",
    )

    def __init__(self, expected_interval_seconds: int = DEFAULT_EXPECTED_INTERVAL_SECONDS) -> None:
        if expected_interval_seconds <= 0:
            raise ValueError("expected_interval_seconds must be positive")
        self.expected_interval_seconds = expected_interval_seconds
        self._newest_ms: int | None = None
        # Timestamps are int32 millisecond offsets from _base_ms (<= the 12 h horizon), so they
        # take 4 bytes instead of 8; _rebase() moves the base about every 24 days.
        self._base_ms = 0
        self._velocity_ts: array[int] = array(_INT32)  # computable samples, last 12 h, sorted
        self._velocity: array[float] = array("d")
        self._store_units = 0  # sum of _velocity in 1e-8 units, for the 7 d window
        self._non_computable_ts: array[int] = array(_INT32)  # only for dedupe
        self._price_ts: array[int] = array(_INT32)  # last PRICE_RETENTION_MINUTES, sorted
        self._price: array[float] = array("d")
        # The newest TREND_POINTS computable samples that left the 12 h store (absolute ms).
        self._tail_ts: array[int] = array("q")
        self._tail_velocity: array[float] = array("d")
        # 7 d ring, slot = hour % 169, allocated when the first sample leaves the 12 h store.
        self._hour_units: array[int] = array("q")
        self._hour_counts: array[int] = array(_UINT32)
        self._hour_units_total = 0
        self._hour_count_total = 0

    # ------------------------------------------------------------------ reading

    @property
    def newest_ts(self) -> datetime | None:
        """Event time of the newest accepted sample (the windows' anchor)."""
        return None if self._newest_ms is None else _from_epoch_ms(self._newest_ms)

    def windows(self, expected_interval_seconds: int | None = None) -> RollingVelocities:
        """1h/4h/12h/7d means of the computable samples, ending at the newest sample."""
        interval = expected_interval_seconds or self.expected_interval_seconds
        means: dict[WindowName, float | None] = {}
        coverage: dict[WindowName, Coverage] = {}
        newest = self._newest_ms
        for name, minutes in WINDOW_MINUTES.items():
            used = 0
            if newest is not None:
                first_ms = (newest // _MS_PER_MINUTE - minutes) * _MS_PER_MINUTE
                start = bisect.bisect_left(self._velocity_ts, first_ms - self._base_ms)
                used = len(self._velocity) - start
            # Slicing copies a contiguous block (cheap); fsum keeps the sum order-independent.
            means[name] = math.fsum(self._velocity[-used:]) / used if used else None
            coverage[name] = Coverage(used, WINDOW_SECONDS[name] // interval)
        # Every sample of the 12 h store lies within the 7 d window; the ring only holds hours
        # inside it (see _expire_hours), so the 7 d totals are two running sums.
        used_7d = len(self._velocity) + self._hour_count_total
        units_7d = self._store_units + self._hour_units_total
        coverage["7d"] = Coverage(used_7d, WINDOW_SECONDS["7d"] // interval)
        return RollingVelocities(
            velocity_1h=means["1h"],
            velocity_4h=means["4h"],
            velocity_12h=means["12h"],
            velocity_7d=units_7d / (used_7d * _UNITS_PER_VELOCITY) if used_7d else None,
            coverage=coverage,
        )

    def previous_computable(self, before_ts: datetime, n: int) -> list[float]:
        """Up to ``n`` computable velocities with event time < ``before_ts``, oldest first.

        Exact for any ``before_ts`` that :meth:`add` accepts: it draws on the 12 h store and,
        up to TREND_POINTS, the samples that left it.
        """
        if n <= 0:
            return []
        before_ms = _epoch_ms(before_ts)
        end = bisect.bisect_left(self._velocity_ts, before_ms - self._base_ms)
        found = self._velocity[max(0, end - n) : end].tolist()
        missing = n - len(found)
        if missing > 0 and self._tail_ts:
            older = [
                velocity
                for ts, velocity in zip(self._tail_ts, self._tail_velocity, strict=True)
                if ts < before_ms
            ]
            found = older[-missing:] + found
        return found

    def price_near(self, target: datetime, tolerance: timedelta) -> float | None:
        """The stored price closest to ``target`` within +-``tolerance`` (ties: the earlier).

        None when no price is there, or when part of that range is older than what is kept
        (then the answer could depend on arrival order).
        """
        if self._newest_ms is None:
            return None
        target_ms = _epoch_ms(target)
        tolerance_ms = tolerance // _ONE_MS
        if target_ms - tolerance_ms < self._newest_ms - _PRICE_RETENTION_MS:
            return None
        target_off = target_ms - self._base_ms
        index = bisect.bisect_left(self._price_ts, target_off)
        best: float | None = None
        best_distance = tolerance_ms + 1
        # Only the neighbours of the insertion point can be closest; check the earlier first.
        for candidate in (index - 1, index):
            if 0 <= candidate < len(self._price_ts):
                distance = abs(self._price_ts[candidate] - target_off)
                if distance < best_distance:
                    best, best_distance = self._price[candidate], distance
        return best

    def price_one_hour_before(self, ts: datetime) -> float | None:
        """The price for the percent_change_1h cross-check of the sample at ``ts``."""
        return self.price_near(ts - PERCENT_CHANGE_LOOKBACK, PRICE_MATCH_TOLERANCE)

    def memory_footprint(self) -> int:
        """Approximate bytes held by this state (object plus its arrays)."""
        columns = (
            self._velocity_ts,
            self._velocity,
            self._non_computable_ts,
            self._price_ts,
            self._price,
            self._tail_ts,
            self._tail_velocity,
            self._hour_units,
            self._hour_counts,
        )
        return sys.getsizeof(self) + sum(sys.getsizeof(column) for column in columns)

    # ------------------------------------------------------------------ writing

    def add(self, ts: datetime, velocity: float | None, price: Number | None) -> AddOutcome:
        """Count one sample (``velocity`` None when not computable) unless late or a duplicate."""
        if velocity is not None and not 0.0 <= velocity <= VELOCITY_CAP:
            raise ValueError(f"velocity must be within [0, {VELOCITY_CAP}], got {velocity!r}")
        ms = _epoch_ms(ts)
        newest = self._newest_ms
        if newest is None:
            self._newest_ms = ms
            self._base_ms = self._horizon_ms(ms)
        elif ms > newest:
            self._advance(ms)
        elif ms // _MS_PER_MINUTE < newest // _MS_PER_MINUTE - ALLOWED_LATENESS_MINUTES:
            return AddOutcome.TOO_LATE
        elif self._contains(ms):
            return AddOutcome.DUPLICATE
        self._insert(ms, velocity, _positive_finite_float(price))
        return AddOutcome.ACCEPTED

    @staticmethod
    def _horizon_ms(newest_ms: int) -> int:
        """Start of the oldest minute still in the 12 h store (and accepted by add)."""
        return (newest_ms // _MS_PER_MINUTE - ALLOWED_LATENESS_MINUTES) * _MS_PER_MINUTE

    def _contains(self, ms: int) -> bool:
        offset = ms - self._base_ms
        for column in (self._velocity_ts, self._non_computable_ts):
            index = bisect.bisect_left(column, offset)
            if index < len(column) and column[index] == offset:
                return True
        return False

    def _insert(self, ms: int, velocity: float | None, price: float | None) -> None:
        offset = ms - self._base_ms
        if velocity is not None:
            index = bisect.bisect_right(self._velocity_ts, offset)
            self._velocity_ts.insert(index, offset)
            self._velocity.insert(index, velocity)
            self._store_units += _velocity_units(velocity)
        else:
            bisect.insort(self._non_computable_ts, offset)
        assert self._newest_ms is not None
        if price is not None and ms >= self._newest_ms - _PRICE_RETENTION_MS:
            index = bisect.bisect_right(self._price_ts, offset)
            self._price_ts.insert(index, offset)
            self._price.insert(index, price)

    def _advance(self, new_newest_ms: int) -> None:
        """Make ``new_newest_ms`` the newest sample: expire hours, prune the 12 h store."""
        assert self._newest_ms is not None
        old_hour = self._newest_ms // _MS_PER_HOUR
        new_hour = new_newest_ms // _MS_PER_HOUR
        self._newest_ms = new_newest_ms
        if self._hour_units and new_hour > old_hour:
            self._expire_hours(old_hour, new_hour)
        horizon_off = self._horizon_ms(new_newest_ms) - self._base_ms
        cut = bisect.bisect_left(self._velocity_ts, horizon_off)
        if cut:
            self._retire_computable(cut, new_hour)
        cut = bisect.bisect_left(self._non_computable_ts, horizon_off)
        if cut:
            del self._non_computable_ts[:cut]
        cut = bisect.bisect_left(
            self._price_ts, new_newest_ms - _PRICE_RETENTION_MS - self._base_ms
        )
        if cut:
            del self._price_ts[:cut]
            del self._price[:cut]
        if new_newest_ms - self._base_ms > _INT32_MAX:
            self._rebase(self._horizon_ms(new_newest_ms))

    def _expire_hours(self, old_hour: int, new_hour: int) -> None:
        """Drop the ring's hours that fell out of the 7 d window; at most 169 slots."""
        first_kept = new_hour - WINDOW_7D_HOURS
        for hour in range(old_hour - WINDOW_7D_HOURS, min(first_kept, old_hour + 1)):
            slot = hour % _HOUR_SLOTS
            self._hour_units_total -= self._hour_units[slot]
            self._hour_count_total -= self._hour_counts[slot]
            self._hour_units[slot] = 0
            self._hour_counts[slot] = 0

    def _retire_computable(self, cut: int, newest_hour: int) -> None:
        """Move the first ``cut`` computable samples from the 12 h store into hour buckets."""
        if not self._hour_units:
            self._hour_units = array("q", bytes(8 * _HOUR_SLOTS))
            self._hour_counts = array(_UINT32, bytes(4 * _HOUR_SLOTS))
        first_kept_hour = newest_hour - WINDOW_7D_HOURS
        base = self._base_ms
        for offset, velocity in zip(self._velocity_ts[:cut], self._velocity[:cut], strict=True):
            units = _velocity_units(velocity)
            self._store_units -= units
            hour = (base + offset) // _MS_PER_HOUR
            if hour >= first_kept_hour:  # else a jump of > 7 d left it outside every window
                slot = hour % _HOUR_SLOTS
                self._hour_units[slot] += units
                self._hour_counts[slot] += 1
                self._hour_units_total += units
                self._hour_count_total += 1
        keep = max(0, cut - TREND_POINTS)
        tail_ts = self._tail_ts.tolist() + [base + offset for offset in self._velocity_ts[keep:cut]]
        tail_velocity = self._tail_velocity.tolist() + self._velocity[keep:cut].tolist()
        self._tail_ts = array("q", tail_ts[-TREND_POINTS:])
        self._tail_velocity = array("d", tail_velocity[-TREND_POINTS:])
        del self._velocity_ts[:cut]
        del self._velocity[:cut]

    def _rebase(self, new_base_ms: int) -> None:
        """Move the offset base forward so that offsets keep fitting in int32."""
        shift = new_base_ms - self._base_ms
        self._base_ms = new_base_ms
        self._velocity_ts = array(_INT32, [offset - shift for offset in self._velocity_ts])
        self._non_computable_ts = array(_INT32, [off - shift for off in self._non_computable_ts])
        self._price_ts = array(_INT32, [offset - shift for offset in self._price_ts])

    # ------------------------------------------------------------------ serialization

    def to_bytes(self) -> bytes:
        """Compact, versioned, little-endian binary form (for a Faust table's changelog).

        About 11 KiB for a token at a 1-minute cadence: 12 bytes per computable sample of the
        last 12 h, 4 per non-computable one, 12 per price of the last 70 minutes, and 2 KiB of
        hour buckets once samples have left the 12 h store.
        """
        newest = self._newest_ms
        flags = 0 if newest is None else _HAS_NEWEST
        hour_units: array[int] = array("q")
        hour_counts: array[int] = array(_UINT32)
        if newest is not None and self._hour_units:
            # The ring rotated to start at the 7 d window's first hour: independent of slots.
            flags |= _HAS_HOURS
            start = (newest // _MS_PER_HOUR - WINDOW_7D_HOURS) % _HOUR_SLOTS
            hour_units = self._hour_units[start:] + self._hour_units[:start]
            hour_counts = self._hour_counts[start:] + self._hour_counts[:start]
        header = _HEADER.pack(
            _MAGIC,
            _FORMAT_VERSION,
            flags,
            newest or 0,
            self._base_ms,
            self._store_units,  # saves from_bytes a pass over the velocities
            len(self._velocity_ts),
            len(self._non_computable_ts),
            len(self._price_ts),
            len(self._tail_ts),
        )
        columns = (
            self._velocity_ts,
            self._velocity,
            self._non_computable_ts,
            self._price_ts,
            self._price,
            self._tail_ts,
            self._tail_velocity,
            hour_units,
            hour_counts,
        )
        return header + b"".join(_little_endian(column) for column in columns)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        expected_interval_seconds: int = DEFAULT_EXPECTED_INTERVAL_SECONDS,
    ) -> TokenWindows:
        """The state :meth:`to_bytes` wrote; ``ValueError`` for anything else."""
        if len(data) < _HEADER.size:
            raise ValueError("truncated TokenWindows state")
        (
            magic,
            version,
            flags,
            newest,
            base,
            store_units,
            n_velocity,
            n_non_computable,
            n_price,
            n_tail,
        ) = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("not a TokenWindows state")
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported TokenWindows state version {version}")
        if flags not in (0, _HAS_NEWEST, _HAS_NEWEST | _HAS_HOURS) or n_tail > TREND_POINTS:
            raise ValueError("corrupt TokenWindows state")
        hour_count = _HOUR_SLOTS if flags & _HAS_HOURS else 0
        state = cls(expected_interval_seconds)
        reader = _Reader(data, _HEADER.size)
        state._newest_ms = newest if flags & _HAS_NEWEST else None
        state._base_ms = base
        state._store_units = store_units
        state._velocity_ts = reader.ints(_INT32, n_velocity)
        state._velocity = reader.floats(n_velocity)
        state._non_computable_ts = reader.ints(_INT32, n_non_computable)
        state._price_ts = reader.ints(_INT32, n_price)
        state._price = reader.floats(n_price)
        state._tail_ts = reader.ints("q", n_tail)
        state._tail_velocity = reader.floats(n_tail)
        hour_units = reader.ints("q", hour_count)
        hour_counts = reader.ints(_UINT32, hour_count)
        reader.finish()
        if hour_count:
            # Undo the rotation of to_bytes: element i is the slot of the window's hour i.
            split = _HOUR_SLOTS - (newest // _MS_PER_HOUR - WINDOW_7D_HOURS) % _HOUR_SLOTS
            state._hour_units = hour_units[split:] + hour_units[:split]
            state._hour_counts = hour_counts[split:] + hour_counts[:split]
            state._hour_units_total = sum(hour_units)
            state._hour_count_total = sum(hour_counts)
        return state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenWindows):
            return NotImplemented
        return (
            self.expected_interval_seconds == other.expected_interval_seconds
            and self.to_bytes() == other.to_bytes()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable: not hashable

    def __repr__(self) -> str:
        return (
            f"TokenWindows(newest_ts={self.newest_ts!r}, computable={len(self._velocity)}, "
            f"non_computable={len(self._non_computable_ts)}, hours={self._hour_count_total})"
        )


# ---------------------------------------------------------------------------------------- quality

QUALITY_WEIGHTS: Final[Mapping[str, float]] = {
    "completeness": 0.30,
    "cross_validation": 0.30,
    "outlier": 0.20,
    "freshness": 0.20,
}
MARKET_CAP_RELATIVE_TOLERANCE: Final = 0.02
PERCENT_CHANGE_ABSOLUTE_TOLERANCE: Final = 5.0  # percentage points
OUTLIER_MIN_POINTS: Final = 5
OUTLIER_Z_THRESHOLD: Final = 3.5
_MAD_SCALE: Final = 0.6745  # Iglewicz & Hoaglin's modified z-score
_MEAN_AD_SCALE: Final = 1.253314  # sqrt(pi / 2): mean absolute deviation of a normal -> sigma
FRESH_FOR: Final = timedelta(minutes=10)
STALE_AT: Final = timedelta(hours=24)
FUTURE_SKEW: Final = timedelta(minutes=2)


@dataclass(frozen=True, slots=True)
class QualityResult:
    score: float  # in [0, 1], two decimals
    flags: list[str]
    components: dict[str, float]  # each in [0, 1], unrounded


def _present(value: Number | None) -> bool:
    return value is not None and _is_finite(value)


def _finite_float(value: Number | None) -> float | None:
    if value is None:
        return None
    try:
        as_float = float(value)
    except OverflowError:
        return None
    return as_float if math.isfinite(as_float) else None


def _median_of_sorted(values: Sequence[float]) -> float:
    """``statistics.median`` of values already sorted: the same arithmetic."""
    n = len(values)
    if n == 0:
        raise statistics.StatisticsError("no median for empty data")
    middle = n // 2
    return values[middle] if n % 2 else (values[middle - 1] + values[middle]) / 2


def robust_z_score(value: float, history: Sequence[float]) -> float:
    """Modified z-score of ``value`` against ``history`` (median/MAD; see module docstring)."""
    # Runs for every quote, on 60 points: one sort each, and abs() mapped in C.
    median = _median_of_sorted(sorted(history))
    deviations = sorted(map(abs, map(operator.sub, history, repeat(median))))
    mad = _median_of_sorted(deviations)
    if mad > 0:
        return _MAD_SCALE * (value - median) / mad
    mean_ad = math.fsum(deviations) / len(deviations)
    if mean_ad > 0:
        return (value - median) / (_MEAN_AD_SCALE * mean_ad)
    if value == median:
        return 0.0
    return math.copysign(math.inf, value - median)


def _freshness(last_updated: datetime, reference_time: datetime) -> tuple[float, str | None]:
    age = reference_time - last_updated
    if age < -FUTURE_SKEW:
        return 0.0, "future_timestamp"
    if age <= FRESH_FOR:
        return 1.0, None
    if age >= STALE_AT:
        return 0.0, "stale"
    return 1.0 - (age - FRESH_FOR) / (STALE_AT - FRESH_FOR), "stale"


def score_quality(
    *,
    velocity: VelocityResult,
    price: Number | None,
    market_cap: Number | None,
    volume_24h: Number | None,
    circulating_supply: Number | None,
    percent_change_1h: Number | None,
    percent_change_24h: Number | None,
    percent_change_7d: Number | None,
    last_updated: datetime,
    reference_time: datetime,
    velocity_history: Sequence[float] = (),
    price_one_hour_before: float | None = None,
) -> QualityResult:
    """The data-quality score of one sample, its flags and its components.

    ``velocity_history``: the token's previous computable velocities (e.g.
    ``windows.previous_computable(ts, OUTLIER_HISTORY_POINTS)``); ``price_one_hour_before``:
    ``windows.price_one_hour_before(ts)``. ``reference_time``: when the sample is judged
    (e.g. the listing answer's ``status.timestamp``).
    """
    flags: list[str] = []
    if velocity.flag is not None:
        flags.append(velocity.flag)

    fields: tuple[tuple[str, Number | None], ...] = (
        ("price_missing", price),
        ("market_cap_missing", market_cap),
        ("volume_missing", volume_24h),
        ("circulating_supply_missing", circulating_supply),
        ("percent_change_1h_missing", percent_change_1h),
        ("percent_change_24h_missing", percent_change_24h),
        ("percent_change_7d_missing", percent_change_7d),
    )
    missing = [flag for flag, value in fields if not _present(value)]
    flags.extend(missing)
    completeness = 1.0 - len(missing) / len(fields)

    checks: list[float] = []
    price_f = _finite_float(price)
    market_cap_f = _finite_float(market_cap)
    supply_f = _finite_float(circulating_supply)
    if price_f is not None and market_cap_f is not None and supply_f is not None:
        implied = price_f * supply_f
        consistent = math.isfinite(implied) and math.isclose(
            market_cap_f, implied, rel_tol=MARKET_CAP_RELATIVE_TOLERANCE
        )
        checks.append(1.0 if consistent else 0.0)
        if not consistent:
            flags.append("market_cap_mismatch")
    reported_change = _finite_float(percent_change_1h)
    if (
        reported_change is not None
        and price_f is not None
        and price_f > 0
        and price_one_hour_before is not None
        and price_one_hour_before > 0
    ):
        own_change = (price_f / price_one_hour_before - 1.0) * 100.0
        consistent = abs(reported_change - own_change) <= PERCENT_CHANGE_ABSOLUTE_TOLERANCE
        checks.append(1.0 if consistent else 0.0)
        if not consistent:
            flags.append("percent_change_mismatch")
    cross_validation = math.fsum(checks) / len(checks) if checks else 1.0

    outlier = 1.0
    current = velocity.computable_velocity
    if (
        current is not None
        and len(velocity_history) >= OUTLIER_MIN_POINTS
        and abs(robust_z_score(current, velocity_history)) > OUTLIER_Z_THRESHOLD
    ):
        outlier = 0.0
        flags.append("velocity_outlier")

    freshness, freshness_flag = _freshness(last_updated, reference_time)
    if freshness_flag is not None:
        flags.append(freshness_flag)

    components = {
        "completeness": completeness,
        "cross_validation": cross_validation,
        "outlier": outlier,
        "freshness": freshness,
    }
    weighted = math.fsum(QUALITY_WEIGHTS[name] * value for name, value in components.items())
    score = round(min(1.0, max(0.0, weighted)), 2)
    return QualityResult(score=score, flags=list(dict.fromkeys(flags)), components=components)
