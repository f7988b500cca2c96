"""Unit tests of tokvel_common.velocity_math: examples and hypothesis properties.

The windows are checked against a brute-force reference that keeps every sample forever and
applies ARCHITECTURE.md's rules literally (plus the documented 720-minute lateness rule).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tokvel_common.velocity_math import (
    OUTLIER_HISTORY_POINTS,
    PRICE_RETENTION_MINUTES,
    AddOutcome,
    Coverage,
    RollingVelocities,
    TokenWindows,
    VelocityResult,
    compute_trend,
    compute_velocity,
    robust_z_score,
    score_quality,
)

MS_PER_MINUTE = 60_000
MS_PER_HOUR = 3_600_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T0 = datetime(2017, 8, 10, tzinfo=UTC)
T0_MINUTE = (T0 - EPOCH) // timedelta(minutes=1)
ABS_TOLERANCE = 1e-9


def at_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def at_minute(minute: int, sub_ms: int = 0) -> datetime:
    return at_ms(minute * MS_PER_MINUTE + sub_ms)


# ------------------------------------------------------------------------------------- velocity


class TestComputeVelocity:
    def test_ordinary_ratio_is_rounded_to_8_decimals(self) -> None:
        # BTC on 2017-08-10 00:00 in the recorded 5-minute week.
        result = compute_velocity(1470650000, 55193041650)
        assert result == VelocityResult(round(1470650000 / 55193041650, 8), True, None)
        assert result.velocity == 0.02664557

    def test_volume_1790_times_market_cap_is_capped_at_100(self) -> None:
        result = compute_velocity(1790 * 2_500_000.0, 2_500_000)
        assert result == VelocityResult(100.0, True, None)

    def test_bitcoin_cash_volume_glitch(self) -> None:
        result = compute_velocity(293137000000, 5_000_000_000)
        assert result == VelocityResult(58.6274, True, None)

    def test_zero_volume_is_computable(self) -> None:
        assert compute_velocity(0, 10) == VelocityResult(0.0, True, None)

    @pytest.mark.parametrize(
        ("volume", "market_cap", "flag"),
        [
            (None, 1e9, "volume_missing"),
            (None, None, "volume_missing"),
            (1e6, None, "market_cap_missing"),
            (1e6, 0, "market_cap_non_positive"),
            (1e6, 0.0, "market_cap_non_positive"),
            (1e6, -5, "market_cap_non_positive"),
            (-1, 1e9, "volume_negative"),
            (1e6, math.nan, "market_cap_not_finite"),
            (1e6, math.inf, "market_cap_not_finite"),
            (math.nan, 1e9, "volume_not_finite"),
            (-math.inf, 1e9, "volume_not_finite"),
            (-1, 0, "market_cap_non_positive"),  # the first failing check is reported
        ],
    )
    def test_not_computable_publishes_zero_and_a_flag(
        self, volume: float | None, market_cap: float | None, flag: str
    ) -> None:
        result = compute_velocity(volume, market_cap)
        assert result == VelocityResult(0.0, False, flag)
        assert result.computable_velocity is None

    def test_tiny_market_cap_with_price_5e_8(self) -> None:
        # SwapToken-like magnitudes: price 5e-8 times a supply of 1e9.
        market_cap = 5e-8 * 1e9
        assert compute_velocity(12.5, market_cap) == VelocityResult(0.25, True, None)

    @pytest.mark.parametrize(
        ("volume", "market_cap", "expected"),
        [
            (10**400, 10**399, 10.0),
            (10**400, 1.0, 100.0),
            (1.0, 10**400, 0.0),
            (10**400, 7, 100.0),
            (10**309, 1e308, 10.0),
            (3 * 10**400, 10**402, 0.03),
            (10**20, 10**400, 0.0),
        ],
    )
    def test_integers_beyond_the_float_range_do_not_overflow(
        self, volume: int | float, market_cap: int | float, expected: float
    ) -> None:
        assert compute_velocity(volume, market_cap) == VelocityResult(expected, True, None)

    @given(
        volume=st.one_of(st.integers(0, 10**30), st.floats(0, 1e300)),
        market_cap=st.one_of(st.integers(1, 10**30), st.floats(min_value=1e-300, max_value=1e300)),
    )
    def test_property_matches_the_formula_and_stays_in_range(
        self, volume: int | float, market_cap: int | float
    ) -> None:
        result = compute_velocity(volume, market_cap)
        assert result.computable
        assert result.flag is None
        assert 0.0 <= result.velocity <= 100.0
        assert result.velocity == round(min(volume / market_cap, 100.0), 8)

    @given(
        volume=st.integers(0, 10**420),
        market_cap=st.integers(1, 10**420),
    )
    def test_property_huge_integers_match_exact_rationals(
        self, volume: int, market_cap: int
    ) -> None:
        exact = min(Fraction(volume, market_cap), Fraction(100))
        assert compute_velocity(volume, market_cap).velocity == round(float(exact), 8)


# ---------------------------------------------------------------------------------------- trend


class TestComputeTrend:
    @pytest.mark.parametrize(
        ("current", "previous", "expected"),
        [
            (None, [1.0, 1.0, 1.0], ("insufficient_data", None)),
            (1.0, [1.0, 1.0], ("insufficient_data", None)),
            (1.0, [], ("insufficient_data", None)),
            (21.0, [20.0, 20.0, 20.0], ("stable", 20.0)),  # exactly +5 %: strict >
            (19.0, [20.0, 20.0, 20.0], ("stable", 20.0)),  # exactly -5 %
            (21.5, [20.0, 20.0, 20.0], ("increasing", 20.0)),
            (18.5, [20.0, 20.0, 20.0], ("decreasing", 20.0)),
            (0.0, [0.0, 0.0, 0.0], ("stable", 0.0)),
            (1e-8, [0.0, 0.0, 0.0], ("increasing", 0.0)),
            (2.0, [100.0, 0.0, 1.0, 2.0, 3.0], ("stable", 2.0)),  # only the last 3 count
        ],
    )
    def test_examples(
        self, current: float | None, previous: list[float], expected: tuple[str, float | None]
    ) -> None:
        assert tuple(compute_trend(current, previous)) == expected

    def test_decimal_five_percent_is_not_exactly_five_percent_in_binary(self) -> None:
        # 1.05 is stored as 1.0500000000000000444: documented, computed as the spec writes it.
        assert compute_trend(1.05, [1.0, 1.0, 1.0]).trend == "increasing"

    @given(
        multiple=st.integers(1, 10**6),
        exponent=st.integers(-30, 5),
    )
    def test_property_boundaries_at_exactly_five_percent(
        self, multiple: int, exponent: int
    ) -> None:
        # avg = 20m * 2^e, so avg * 1.05 = 21m * 2^e and avg * 0.95 = 19m * 2^e are exact floats.
        scale = math.ldexp(1.0, exponent)
        average = 20 * multiple * scale
        up, down = 21 * multiple * scale, 19 * multiple * scale
        previous = [average] * 3
        assert compute_trend(up, previous).trend == "stable"
        assert compute_trend(down, previous).trend == "stable"
        assert compute_trend(math.nextafter(up, math.inf), previous).trend == "increasing"
        assert compute_trend(math.nextafter(down, 0.0), previous).trend == "decreasing"

    @given(
        current=st.none() | st.floats(0, 100),
        previous=st.lists(st.floats(0, 100), max_size=6),
    )
    def test_property_matches_the_spec(self, current: float | None, previous: list[float]) -> None:
        result = compute_trend(current, previous)
        if current is None or len(previous) < 3:
            assert result == ("insufficient_data", None)
            return
        average = math.fsum(previous[-3:]) / 3
        assert result.recent_avg == average
        if average == 0:
            assert result.trend == ("stable" if current == 0 else "increasing")
        elif (current - average) / average > 0.05:
            assert result.trend == "increasing"
        elif (average - current) / average > 0.05:
            assert result.trend == "decreasing"
        else:
            assert result.trend == "stable"


# -------------------------------------------------------------------------------------- windows


@dataclass
class ReferenceWindows:
    """Keeps every accepted sample forever and applies the rules literally."""

    samples: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)
    newest: int | None = None

    def add(self, ms: int, velocity: float | None, price: float | None) -> AddOutcome:
        if self.newest is not None and ms // MS_PER_MINUTE < self.newest // MS_PER_MINUTE - 720:
            return AddOutcome.TOO_LATE
        if ms in self.samples:
            return AddOutcome.DUPLICATE
        self.samples[ms] = (velocity, price)
        self.newest = ms if self.newest is None else max(self.newest, ms)
        return AddOutcome.ACCEPTED

    def means(self) -> dict[str, tuple[float | None, int]]:
        assert self.newest is not None
        newest_minute = self.newest // MS_PER_MINUTE
        newest_hour = self.newest // MS_PER_HOUR
        result: dict[str, tuple[float | None, int]] = {}
        for name, minutes in (("1h", 60), ("4h", 240), ("12h", 720)):
            values = [
                v
                for ms, (v, _) in self.samples.items()
                if v is not None and newest_minute - minutes <= ms // MS_PER_MINUTE
            ]
            result[name] = (sum(values) / len(values) if values else None, len(values))
        values = [
            v
            for ms, (v, _) in self.samples.items()
            if v is not None and newest_hour - 168 <= ms // MS_PER_HOUR
        ]
        result["7d"] = (sum(values) / len(values) if values else None, len(values))
        return result

    def previous(self, before_ms: int) -> list[float]:
        return [
            v for ms, (v, _) in sorted(self.samples.items()) if ms < before_ms and v is not None
        ]

    def price_one_hour_before(self, ms: int) -> float | None:
        assert self.newest is not None
        target, tolerance = ms - MS_PER_HOUR, 5 * MS_PER_MINUTE
        if target - tolerance < self.newest - PRICE_RETENTION_MINUTES * MS_PER_MINUTE:
            return None
        candidates = sorted(
            (abs(t - target), t, p)
            for t, (_, p) in self.samples.items()
            if p is not None and abs(t - target) <= tolerance
        )
        return candidates[0][2] if candidates else None


def assert_windows_match(windows: RollingVelocities, reference: ReferenceWindows) -> None:
    actual = {
        "1h": windows.velocity_1h,
        "4h": windows.velocity_4h,
        "12h": windows.velocity_12h,
        "7d": windows.velocity_7d,
    }
    for name, (expected_mean, expected_used) in reference.means().items():
        assert windows.coverage[name].points_used == expected_used, name  # type: ignore[index]
        mean = actual[name]
        if expected_mean is None:
            assert mean is None, name
        else:
            assert mean is not None, name
            assert math.isclose(mean, expected_mean, rel_tol=0, abs_tol=ABS_TOLERANCE), name


# Steps that land samples exactly on (and next to) every window and lateness edge.
INTERESTING_STEPS_MINUTES = [0, 1, -1, 5, -5, 59, 60, 61, -60, 239, 240, 241, -719, -720, -721]
INTERESTING_STEPS_MINUTES += [720, 721, 167 * 60, 168 * 60, 169 * 60, 10_080]
velocities = st.floats(0, 100).map(lambda value: round(value, 8))
Sample = tuple[int, float | None, float | None]


@st.composite
def sample_streams(draw: st.DrawFn) -> list[Sample]:
    """Arrival-ordered samples: forward jumps, late and out-of-order ones, duplicates, gaps."""
    count = draw(st.integers(0, 60))
    minute = T0_MINUTE
    stream: list[Sample] = []
    for _ in range(count):
        if stream and draw(st.integers(0, 9)) == 0:
            repeated_ms = draw(st.sampled_from(stream))[0]  # an exact duplicate timestamp
            stream.append((repeated_ms, draw(st.none() | velocities), None))
            continue
        step = draw(
            st.one_of(
                st.sampled_from(INTERESTING_STEPS_MINUTES),
                st.integers(-800, 2_000),
            )
        )
        minute += step
        sub_ms = draw(st.sampled_from([0, 1, 29_999, 59_999]) | st.integers(0, 59_999))
        velocity = draw(st.none() | velocities)
        price = draw(st.none() | st.floats(1e-9, 1e6))
        stream.append((minute * MS_PER_MINUTE + sub_ms, velocity, price))
    return stream


def feed(stream: Sequence[Sample], *, check_every_step: bool = True) -> TokenWindows:
    state = TokenWindows()
    reference = ReferenceWindows()
    for ms, velocity, price in stream:
        expected = reference.add(ms, velocity, price)
        assert state.add(at_ms(ms), velocity, price) == expected
        assert state.newest_ts == at_ms(reference.newest or 0)
        if expected is AddOutcome.ACCEPTED:
            previous = reference.previous(ms)
            assert state.previous_computable(at_ms(ms), 3) == previous[-3:]
            longer = state.previous_computable(at_ms(ms), OUTLIER_HISTORY_POINTS)
            assert longer == previous[len(previous) - len(longer) :]
            assert compute_trend(velocity, longer) == compute_trend(velocity, previous)
            assert state.price_one_hour_before(at_ms(ms)) == reference.price_one_hour_before(ms)
        if check_every_step:
            assert_windows_match(state.windows(), reference)
    if reference.newest is not None:
        assert_windows_match(state.windows(), reference)
    return state


class TestTokenWindowsExamples:
    def test_empty_state(self) -> None:
        state = TokenWindows()
        windows = state.windows()
        assert state.newest_ts is None
        assert windows.velocity_1h is None
        assert windows.velocity_7d is None
        assert windows.coverage["1h"] == Coverage(0, 60)
        assert windows.coverage["7d"] == Coverage(0, 10_080)
        assert state.previous_computable(T0, 3) == []
        assert state.price_near(T0, timedelta(minutes=5)) is None

    def test_minute_edges_are_inclusive_at_60_240_720(self) -> None:
        newest = T0_MINUTE + 2_000
        state = TokenWindows(expected_interval_seconds=300)
        for minute, sub_ms, velocity in [
            (newest - 721, 59_999, 6.0),  # leaves the 12 h store, stays in 7 d
            (newest - 720, 0, 5.0),
            (newest - 241, 59_999, 4.0),
            (newest - 240, 0, 3.0),
            (newest - 61, 59_999, 2.0),
            (newest - 60, 0, 1.0),
            (newest, 59_999, 10.0),
        ]:
            assert state.add(at_minute(minute, sub_ms), velocity, None) is AddOutcome.ACCEPTED
        windows = state.windows()
        assert windows.velocity_1h == (1 + 10) / 2
        assert windows.velocity_4h == (1 + 2 + 3 + 10) / 4
        assert windows.velocity_12h == (1 + 2 + 3 + 4 + 5 + 10) / 6
        assert windows.velocity_7d == (1 + 2 + 3 + 4 + 5 + 6 + 10) / 7
        assert windows.coverage == {
            "1h": Coverage(2, 12),
            "4h": Coverage(4, 48),
            "12h": Coverage(6, 144),
            "7d": Coverage(7, 2016),
        }

    def test_hour_edges_are_inclusive_at_168(self) -> None:
        newest_hour = T0_MINUTE // 60 + 500
        state = TokenWindows()
        state.add(at_ms((newest_hour - 169) * MS_PER_HOUR + MS_PER_HOUR - 1), 9.0, None)
        state.add(at_ms((newest_hour - 168) * MS_PER_HOUR), 2.0, None)
        state.add(at_ms((newest_hour - 100) * MS_PER_HOUR), 4.0, None)
        state.add(at_ms(newest_hour * MS_PER_HOUR + MS_PER_HOUR - 1), 6.0, None)
        windows = state.windows()
        assert windows.velocity_7d == 4.0
        assert windows.coverage["7d"].points_used == 3
        assert windows.velocity_1h == 6.0

    def test_lateness_limit_is_720_minutes_before_the_newest_minute(self) -> None:
        state = TokenWindows()
        newest = T0_MINUTE + 1_000
        state.add(at_minute(newest, 30_000), 1.0, None)
        assert state.add(at_minute(newest - 721, 59_999), 2.0, None) is AddOutcome.TOO_LATE
        assert state.add(at_minute(newest - 720, 0), 3.0, None) is AddOutcome.ACCEPTED
        assert state.windows().velocity_12h == 2.0
        assert state.windows().velocity_1h == 1.0  # a late sample never replaces the newest
        assert state.newest_ts == at_minute(newest, 30_000)

    def test_duplicates_count_once_and_the_first_wins(self) -> None:
        state = TokenWindows()
        assert state.add(T0, 1.0, 10.0) is AddOutcome.ACCEPTED
        before = state.to_bytes()
        assert state.add(T0, 3.0, 20.0) is AddOutcome.DUPLICATE
        assert state.add(T0, None, None) is AddOutcome.DUPLICATE
        assert state.to_bytes() == before
        assert state.add(T0 + timedelta(milliseconds=1), None, None) is AddOutcome.ACCEPTED
        assert state.add(T0 + timedelta(milliseconds=1), 5.0, None) is AddOutcome.DUPLICATE
        assert state.windows().velocity_1h == 1.0

    def test_non_computable_samples_enter_no_window(self) -> None:
        state = TokenWindows()
        for minute in range(5):
            state.add(at_minute(T0_MINUTE + minute), None, 1.0)
        windows = state.windows()
        assert (windows.velocity_1h, windows.velocity_7d) == (None, None)
        assert windows.coverage["1h"].points_used == 0
        assert state.previous_computable(at_minute(T0_MINUTE + 10), 3) == []

    def test_trend_history_survives_a_gap_longer_than_12_hours(self) -> None:
        state = TokenWindows()
        for minute, velocity in enumerate([1.0, 2.0, 3.0, 4.0]):
            state.add(at_minute(T0_MINUTE + minute), velocity, None)
        later = at_minute(T0_MINUTE + 3 * 24 * 60)
        state.add(later, 8.0, None)
        assert state.windows().velocity_12h == 8.0
        assert state.windows().velocity_7d == (1 + 2 + 3 + 4 + 8) / 5
        assert state.previous_computable(later, 3) == [2.0, 3.0, 4.0]
        assert state.previous_computable(later, 10) == [2.0, 3.0, 4.0]

    def test_a_jump_beyond_7_days_forgets_everything_but_the_trend_tail(self) -> None:
        state = TokenWindows()
        for minute in range(10):
            state.add(at_minute(T0_MINUTE + minute), 1.0, None)
        far = at_minute(T0_MINUTE + 8 * 24 * 60)
        state.add(far, 3.0, None)
        windows = state.windows()
        assert windows.velocity_7d == 3.0
        assert windows.coverage["7d"].points_used == 1
        assert state.previous_computable(far, 3) == [1.0, 1.0, 1.0]

    def test_price_one_hour_before_picks_the_closest_within_5_minutes(self) -> None:
        state = TokenWindows()
        now = T0_MINUTE + 100
        state.add(at_minute(now - 66), None, 1.0)  # outside the tolerance
        state.add(at_minute(now - 62), None, 2.0)
        state.add(at_minute(now - 57), None, 3.0)
        state.add(at_minute(now), 0.5, 4.0)
        assert state.price_one_hour_before(at_minute(now)) == 2.0
        state.add(at_minute(now - 59), None, 5.0)  # a late sample, now the closest
        assert state.price_one_hour_before(at_minute(now)) == 5.0
        assert state.price_one_hour_before(at_minute(now - 30)) is None  # history not kept

    def test_price_ties_go_to_the_earlier_sample(self) -> None:
        state = TokenWindows()
        now = T0_MINUTE + 100
        state.add(at_minute(now - 58), None, 2.0)
        state.add(at_minute(now - 62), None, 1.0)
        state.add(at_minute(now), None, 4.0)
        assert state.price_one_hour_before(at_minute(now)) == 1.0

    def test_prices_as_integers_and_unusable_prices(self) -> None:
        state = TokenWindows()
        state.add(T0, None, 2)
        state.add(T0 + timedelta(minutes=1), None, 0)
        state.add(T0 + timedelta(minutes=2), None, 10**400)
        state.add(T0 + timedelta(minutes=3), None, math.nan)
        state.add(T0 + timedelta(hours=1), None, 3.0)
        assert state.price_near(T0, timedelta(minutes=5)) == 2.0

    @pytest.mark.parametrize("velocity", [-0.1, 100.5, math.nan, math.inf])
    def test_rejects_velocities_outside_0_100(self, velocity: float) -> None:
        with pytest.raises(ValueError, match="velocity"):
            TokenWindows().add(T0, velocity, None)

    def test_rejects_a_non_positive_interval(self) -> None:
        with pytest.raises(ValueError, match="positive"):
            TokenWindows(expected_interval_seconds=0)

    def test_naive_datetimes_are_read_as_utc(self) -> None:
        state = TokenWindows()
        state.add(T0.replace(tzinfo=None), 1.0, None)
        assert state.newest_ts == T0
        assert state.add(T0, 2.0, None) is AddOutcome.DUPLICATE

    def test_expected_interval_override(self) -> None:
        state = TokenWindows(expected_interval_seconds=300)
        state.add(T0, 1.0, None)
        assert state.windows().coverage["1h"] == Coverage(1, 12)
        assert state.windows(expected_interval_seconds=60).coverage["4h"] == Coverage(1, 240)


def one_minute_stream(days: float, seed: int) -> list[Sample]:
    """A steady stream at 1-minute cadence with jitter, gaps in volume and some late repeats."""
    rng = random.Random(seed)
    stream: list[Sample] = []
    for minute in range(int(days * 24 * 60)):
        ms = (T0_MINUTE + minute) * MS_PER_MINUTE + rng.randrange(0, 2_000)
        velocity = None if rng.random() < 0.1 else round(rng.uniform(0, 100), 8)
        stream.append((ms, velocity, rng.uniform(1e-8, 4e5)))
        if rng.random() < 0.05:
            stream.append(stream[rng.randrange(max(0, len(stream) - 30), len(stream))])
    return stream


class TestTokenWindowsAgainstReference:
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(stream=sample_streams())
    def test_property_windows_equal_brute_force(self, stream: list[Sample]) -> None:
        feed(stream)

    def test_eight_days_at_one_minute_cadence(self) -> None:
        state = TokenWindows()
        reference = ReferenceWindows()
        for index, (ms, velocity, price) in enumerate(one_minute_stream(8, seed=1)):
            assert state.add(at_ms(ms), velocity, price) == reference.add(ms, velocity, price)
            if index % 997 == 0:
                assert_windows_match(state.windows(), reference)
        assert_windows_match(state.windows(), reference)
        assert state.windows().coverage["7d"].points_used > 9_000

    def test_a_month_at_hourly_cadence_rebases_offsets(self) -> None:
        # int32 millisecond offsets overflow after ~24.8 days: the base must move.
        stream: list[Sample] = [
            ((T0_MINUTE + 60 * hour) * MS_PER_MINUTE, 1.0 + hour % 7, None) for hour in range(800)
        ]
        stream.append((stream[-1][0] + 40 * 24 * MS_PER_HOUR, 2.5, 1.0))
        stream.append((stream[-1][0] - 5 * MS_PER_MINUTE, 3.5, 2.0))
        feed(stream, check_every_step=False)


# -------------------------------------------------------------------------------- serialization


class TestSerialization:
    @settings(max_examples=100, deadline=None)
    @given(stream=sample_streams(), continuation=sample_streams())
    def test_property_round_trip(self, stream: list[Sample], continuation: list[Sample]) -> None:
        state = TokenWindows(expected_interval_seconds=300)
        for ms, velocity, price in stream:
            state.add(at_ms(ms), velocity, price)
        data = state.to_bytes()
        restored = TokenWindows.from_bytes(data, expected_interval_seconds=300)
        assert restored == state
        assert restored.to_bytes() == data
        assert restored.windows() == state.windows()
        # The restored state behaves identically from here on.
        for ms, velocity, price in continuation:
            ts = at_ms(ms)
            assert restored.add(ts, velocity, price) == state.add(ts, velocity, price)
            assert restored.previous_computable(ts, 5) == state.previous_computable(ts, 5)
            assert restored.price_one_hour_before(ts) == state.price_one_hour_before(ts)
        assert restored.windows() == state.windows()
        assert restored == state

    def test_round_trip_of_a_full_week(self) -> None:
        state = TokenWindows()
        for ms, velocity, price in one_minute_stream(7.5, seed=2):
            state.add(at_ms(ms), velocity, price)
        restored = TokenWindows.from_bytes(state.to_bytes())
        assert restored == state
        assert restored.windows() == state.windows()

    def test_empty_round_trip(self) -> None:
        assert TokenWindows.from_bytes(TokenWindows().to_bytes()) == TokenWindows()

    def test_rejects_malformed_input(self) -> None:
        state = TokenWindows()
        state.add(T0, 1.0, 2.0)
        data = state.to_bytes()
        for bad in (b"", data[:10], data[:-1], data + b"\0", b"XXXX" + data[4:]):
            with pytest.raises(ValueError, match="TokenWindows"):
                TokenWindows.from_bytes(bad)
        with pytest.raises(ValueError, match="version"):
            TokenWindows.from_bytes(data[:4] + b"\x09" + data[5:])

    def test_equality_and_repr(self) -> None:
        state = TokenWindows()
        assert state != TokenWindows(expected_interval_seconds=300)
        assert state != "state"
        assert "TokenWindows(" in repr(state)


# ---------------------------------------------------------------------------- memory and speed


class TestResources:
    def test_memory_is_bounded_at_one_minute_cadence(self) -> None:
        state = TokenWindows()
        sizes: list[int] = []
        for index, (ms, velocity, price) in enumerate(one_minute_stream(9, seed=3)):
            state.add(at_ms(ms), 1.0 if velocity is None else velocity, price)
            if index % 1_000 == 0:
                sizes.append(len(state.to_bytes()))
        assert max(sizes) < 16 * 1024
        assert len(state.to_bytes()) < 16 * 1024
        # 10 000 tokens in < 128 MiB: about 13 KiB each, arrays' over-allocation included.
        assert state.memory_footprint() < 13 * 1024

    def test_add_and_windows_are_fast(self) -> None:
        stream = one_minute_stream(2, seed=4)
        state = TokenWindows()
        started = time.perf_counter()
        for ms, velocity, price in stream:
            state.add(at_ms(ms), velocity, price)
            state.windows()
        per_call = (time.perf_counter() - started) / len(stream)
        # ~20 us on a laptop; the bound only catches accidental O(n^2) behaviour.
        assert per_call < 500e-6


# -------------------------------------------------------------------------------------- quality


def quality(**overrides: object) -> tuple[float, list[str], dict[str, float]]:
    arguments: dict[str, object] = {
        "velocity": compute_velocity(1_000_000, 50_000_000),
        "price": 2.0,
        "market_cap": 50_000_000,
        "volume_24h": 1_000_000,
        "circulating_supply": 25_000_000,
        "percent_change_1h": 10.0,
        "percent_change_24h": -3.5,
        "percent_change_7d": 120.0,
        "last_updated": T0,
        "reference_time": T0 + timedelta(minutes=1),
        "velocity_history": [0.02, 0.021, 0.019, 0.02, 0.0205],
        "price_one_hour_before": 2.0 / 1.1,
    }
    arguments.update(overrides)
    result = score_quality(**arguments)  # type: ignore[arg-type]
    return result.score, result.flags, result.components


class TestScoreQuality:
    def test_a_clean_sample_scores_one(self) -> None:
        score, flags, components = quality()
        assert (score, flags) == (1.0, [])
        assert components == {
            "completeness": 1.0,
            "cross_validation": 1.0,
            "outlier": 1.0,
            "freshness": 1.0,
        }

    def test_missing_volume_is_flagged_once(self) -> None:
        score, flags, components = quality(velocity=compute_velocity(None, 1), volume_24h=None)
        assert flags == ["volume_missing"]
        assert components["completeness"] == 1 - 1 / 7
        assert score == round(1 - 0.3 / 7, 2) == 0.96

    def test_everything_missing(self) -> None:
        score, flags, _ = quality(
            velocity=compute_velocity(None, None),
            price=None,
            market_cap=None,
            volume_24h=None,
            circulating_supply=None,
            percent_change_1h=None,
            percent_change_24h=None,
            percent_change_7d=None,
        )
        assert flags == [
            "volume_missing",
            "price_missing",
            "market_cap_missing",
            "circulating_supply_missing",
            "percent_change_1h_missing",
            "percent_change_24h_missing",
            "percent_change_7d_missing",
        ]
        assert score == 0.7  # completeness 0, the other components neutral

    def test_market_cap_mismatch_beyond_2_percent(self) -> None:
        assert quality(market_cap=51_000_000)[1] == []  # 1.96 %
        score, flags, components = quality(market_cap=51_100_000)
        assert flags == ["market_cap_mismatch"]
        assert components["cross_validation"] == 0.5
        assert score == 0.85

    def test_zero_market_cap_with_a_real_supply_is_a_mismatch(self) -> None:
        _, flags, _ = quality(velocity=compute_velocity(1_000_000, 0), market_cap=0)
        assert flags == ["market_cap_non_positive", "market_cap_mismatch"]

    def test_tiny_price_and_huge_supply_are_consistent(self) -> None:
        # SwapToken's $5e-8 and a SHIB-like supply of 5.9e14.
        _, flags, _ = quality(
            price=5e-8,
            circulating_supply=589_000_000_000_000,
            market_cap=29_450_000,
            price_one_hour_before=5e-8 / 1.1,
        )
        assert flags == []

    def test_percent_change_cross_check(self) -> None:
        assert quality(percent_change_1h=14.9)[1] == []
        assert quality(percent_change_1h=15.1)[1] == ["percent_change_mismatch"]
        assert quality(percent_change_1h=1_000_000.0)[1] == ["percent_change_mismatch"]
        assert quality(percent_change_1h=500.0, price_one_hour_before=None)[1] == []

    def test_velocity_outlier(self) -> None:
        _, flags, components = quality(velocity=compute_velocity(1790, 1))
        assert flags == ["velocity_outlier"]
        assert components["outlier"] == 0.0
        assert quality(velocity=compute_velocity(1790, 1), velocity_history=[0.02] * 4)[1] == []

    def test_robust_z_score_with_zero_mad(self) -> None:
        assert robust_z_score(1.0, [1.0, 1.0, 1.0, 1.0, 1.0]) == 0.0
        assert robust_z_score(1.1, [1.0, 1.0, 1.0, 1.0, 1.0]) == math.inf
        assert robust_z_score(0.9, [1.0, 1.0, 1.0, 1.0, 1.0]) == -math.inf
        # MAD 0 but spread in the tail: mean absolute deviation 0.4 around the median 1.0.
        assert robust_z_score(2.0, [1.0, 1.0, 1.0, 2.0, 3.0]) == pytest.approx(1 / (1.253314 * 0.6))
        assert robust_z_score(3.0, [1.0, 2.0, 3.0, 4.0, 5.0]) == 0.0

    @pytest.mark.parametrize(
        ("age", "freshness", "flag"),
        [
            (timedelta(minutes=10), 1.0, None),
            (timedelta(minutes=-2), 1.0, None),
            (timedelta(hours=24), 0.0, "stale"),
            (timedelta(days=30), 0.0, "stale"),
            (timedelta(hours=12, minutes=5), 0.5, "stale"),
            (timedelta(minutes=-3), 0.0, "future_timestamp"),
        ],
    )
    def test_freshness(self, age: timedelta, freshness: float, flag: str | None) -> None:
        _, flags, components = quality(reference_time=T0 + age)
        assert components["freshness"] == pytest.approx(freshness)
        assert flags == ([] if flag is None else [flag])

    def test_huge_integers_do_not_overflow(self) -> None:
        score, flags, _ = quality(
            velocity=compute_velocity(10**400, 10**401),
            volume_24h=10**400,
            market_cap=10**401,
            circulating_supply=10**400,
            percent_change_7d=10**400,
        )
        assert 0.0 <= score <= 1.0
        assert "market_cap_mismatch" not in flags

    numbers = st.none() | st.integers(-(10**20), 10**400) | st.floats(allow_nan=True)

    @settings(max_examples=200)
    @given(
        volume=numbers,
        market_cap=numbers,
        price=numbers,
        supply=numbers,
        changes=st.tuples(numbers, numbers, numbers),
        age_seconds=st.integers(-(10**6), 10**7),
        history=st.lists(st.floats(0, 100), max_size=12),
        price_before=st.none() | st.floats(0, 1e12),
    )
    @example(
        volume=None,
        market_cap=None,
        price=None,
        supply=None,
        changes=(None, None, None),
        age_seconds=10**7,
        history=[],
        price_before=None,
    )
    def test_property_score_in_unit_interval_with_two_decimals(
        self,
        volume: int | float | None,
        market_cap: int | float | None,
        price: int | float | None,
        supply: int | float | None,
        changes: tuple[int | float | None, int | float | None, int | float | None],
        age_seconds: int,
        history: list[float],
        price_before: float | None,
    ) -> None:
        velocity = compute_velocity(volume, market_cap)
        result = score_quality(
            velocity=velocity,
            price=price,
            market_cap=market_cap,
            volume_24h=volume,
            circulating_supply=supply,
            percent_change_1h=changes[0],
            percent_change_24h=changes[1],
            percent_change_7d=changes[2],
            last_updated=T0,
            reference_time=T0 + timedelta(seconds=age_seconds),
            velocity_history=history,
            price_one_hour_before=price_before,
        )
        assert 0.0 <= result.score <= 1.0
        assert round(result.score, 2) == result.score
        assert all(0.0 <= value <= 1.0 for value in result.components.values())
        assert len(set(result.flags)) == len(result.flags)
        if velocity.flag is not None:
            assert velocity.flag in result.flags
        expected = sum(
            weight * result.components[name]
            for name, weight in (
                ("completeness", 0.3),
                ("cross_validation", 0.3),
                ("outlier", 0.2),
                ("freshness", 0.2),
            )
        )
        assert result.score == pytest.approx(expected, abs=0.005 + 1e-12)
