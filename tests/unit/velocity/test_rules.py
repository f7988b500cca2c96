"""velocity.rules: every dead-letter reason of validate(), and apply() on one token's state."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest

from tests.unit.velocity.quotes import T0, cmc_time, message, quote
from tokvel_common.events import MetricsSample
from tokvel_common.serialization import encode
from tokvel_common.velocity_math import AddOutcome, TokenWindows
from velocity.rules import Applied, Observation, Rejection, apply, validate

SKEW = timedelta(minutes=5)


def observe(value: dict[str, Any]) -> Observation:
    result = validate(*message(value), future_skew=SKEW)
    assert isinstance(result, Observation), result
    return result


def rejection(key: bytes | None, value: bytes | None) -> str:
    result = validate(key, value, future_skew=SKEW)
    assert isinstance(result, Rejection), result
    assert result.detail
    return result.reason


# ------------------------------------------------------------------------------------ validate


@pytest.mark.parametrize("version", ["v3", "v1"])
def test_a_real_shaped_quote_is_valid_in_both_api_shapes(version: str) -> None:
    observation = observe(quote(1027, version=version))
    assert observation.key == b"1027"
    assert observation.quote.id == 1027
    assert observation.usd.volume_24h == 2_376_000_000
    assert observation.ts == T0
    assert observation.listed_at == T0


def test_freshness_is_judged_at_polled_at_when_the_answer_had_no_timestamp() -> None:
    value = quote()
    del value["listed_at"]
    assert observe(value).listed_at == T0 + timedelta(seconds=1)


def test_a_tombstone_is_rejected() -> None:
    assert rejection(b"1", None) == "missing_value"


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"",
        b'{"id": 1, "x": NaN}',
        b'{"id": 1, "x": Infinity}',
        b'{"id": 1, "x": 1e999}',  # beyond the double range: JSON cannot say infinity
    ],
)
def test_invalid_json_and_non_finite_numbers_are_rejected(raw: bytes) -> None:
    assert rejection(b"1", raw) == "invalid_json"


def test_a_value_that_is_not_an_object_is_rejected() -> None:
    assert rejection(b"1", b"[1, 2]") == "not_an_object"


@pytest.mark.parametrize(
    ("field", "bad"),
    [("id", None), ("id", "one"), ("polled_at", "yesterday"), ("source", None)],
)
def test_wrong_types_and_missing_fields_are_schema_violations(field: str, bad: Any) -> None:
    value = quote()
    value[field] = bad
    assert rejection(b"1", orjson.dumps(value)) == "schema_violation"


def test_a_non_numeric_price_is_a_schema_violation() -> None:
    value = quote()
    value["quote"][0]["price"] = "cheap"
    assert rejection(*message(value)) == "schema_violation"


@pytest.mark.parametrize("key", [b"2", b"", None, b"01"])
def test_a_key_other_than_the_id_is_rejected(key: bytes | None) -> None:
    assert rejection(key, orjson.dumps(quote(1))) == "key_mismatch"


@pytest.mark.parametrize("quotes", [[], {"EUR": {"price": 1.0}}])
def test_an_entry_without_usd_quote_is_rejected(quotes: Any) -> None:
    assert rejection(*message(quote(quote=quotes))) == "missing_usd_quote"


def test_an_entry_without_last_updated_is_rejected() -> None:
    value = quote(last_updated=None)
    value["quote"][0]["last_updated"] = None
    assert rejection(*message(value)) == "missing_last_updated"


def test_the_entry_last_updated_serves_when_the_quote_has_none() -> None:
    value = quote()
    value["quote"][0]["last_updated"] = None
    assert observe(value).ts == T0


@pytest.mark.parametrize(
    "change",
    [
        {"price": -0.01},
        {"volume": -1},
        {"market_cap": -5},
        {"circulating_supply": -1},
        {"total_supply": -2},
        {"max_supply": -3.5},
    ],
)
def test_negative_amounts_are_rejected(change: dict[str, Any]) -> None:
    assert rejection(*message(quote(**change))) == "negative_number"


def test_negative_percent_changes_and_zero_amounts_are_valid() -> None:
    value = quote(market_cap=0, volume=0, price=0)
    value["quote"][0]["percent_change_24h"] = -99.9
    assert observe(value).usd.percent_change_24h == -99.9


def test_last_updated_beyond_the_skew_after_the_listing_is_rejected() -> None:
    assert rejection(*message(quote(ts=T0 + SKEW + timedelta(milliseconds=1), listed_at=T0))) == (
        "future_timestamp"
    )
    assert observe(quote(ts=T0 + SKEW, listed_at=T0)).ts == T0 + SKEW


def test_the_skew_is_measured_against_polled_at_without_listed_at() -> None:
    value = quote(ts=T0 + SKEW + timedelta(seconds=2), listed_at=T0)
    del value["listed_at"]  # polled_at = T0 + 1 s
    assert rejection(*message(value)) == "future_timestamp"


def test_huge_supplies_and_tiny_prices_are_kept_exactly() -> None:
    observation = observe(quote(price=5e-10, circulating_supply=589_247_012_435_018))
    assert observation.usd.price == 5e-10
    assert observation.quote.circulating_supply == 589_247_012_435_018


# --------------------------------------------------------------------------------------- apply


def applied(windows: TokenWindows, **fields: Any) -> Applied:
    return apply(observe(quote(**fields)), windows)


def test_the_first_sample_carries_every_field() -> None:
    windows = TokenWindows(300)
    result = applied(windows)
    assert result.outcome is AddOutcome.ACCEPTED and result.newest
    sample = result.sample
    assert sample is not None
    velocity = round(2_376_000_000 / 68_567_694_895, 8)
    assert sample.velocity == sample.velocity_24h == velocity
    assert sample.velocity_1h == sample.velocity_4h == sample.velocity_12h == velocity
    assert sample.velocity_7d == pytest.approx(velocity, abs=1e-15)
    assert {name: (c.points_used, c.points_expected) for name, c in sample.coverage.items()} == {
        "1h": (1, 12),
        "4h": (1, 48),
        "12h": (1, 144),
        "7d": (1, 2016),
    }
    assert (sample.trend, sample.trend_recent_avg) == ("insufficient_data", None)
    assert sample.data_quality_score == 1.0 and sample.quality_flags == []
    assert (sample.cmc_id, sample.symbol, sample.name, sample.slug) == (
        1,
        "T1",
        "Token 1",
        "token-1",
    )
    assert (sample.ts, sample.price_usd, sample.market_cap_usd, sample.cmc_rank) == (
        T0,
        4149.94,
        68_567_694_895,
        1,
    )
    assert sample.polled_at == T0 + timedelta(seconds=1)
    assert sample.schema_version == 1


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"volume": None}, "volume_missing"),
        ({"market_cap": None}, "market_cap_missing"),
        ({"market_cap": 0}, "market_cap_non_positive"),
    ],
)
def test_a_sample_that_is_not_computable_enters_no_window(
    change: dict[str, Any], flag: str
) -> None:
    windows = TokenWindows(300)
    first = applied(windows, **change).sample
    assert first is not None
    assert first.velocity == first.velocity_24h == 0.0
    assert flag in first.quality_flags
    assert first.velocity_1h is None and first.velocity_7d is None
    assert first.coverage["1h"].points_used == 0
    second = applied(windows, ts=T0 + timedelta(minutes=5), volume=1.0, market_cap=10.0).sample
    assert second is not None
    assert second.velocity_1h == 0.1  # the first sample does not count
    assert second.coverage["12h"].points_used == 1


def test_a_duplicate_changes_nothing_and_has_no_sample() -> None:
    windows = TokenWindows(300)
    applied(windows)
    before = windows.to_bytes()
    result = applied(windows, volume=1.0)  # same last_updated, other numbers: the first wins
    assert result == Applied(AddOutcome.DUPLICATE, None, newest=False)
    assert windows.to_bytes() == before


def test_a_sample_more_than_12_hours_late_is_too_late() -> None:
    windows = TokenWindows(300)
    applied(windows, ts=T0 + timedelta(hours=13))
    result = applied(windows)
    assert result == Applied(AddOutcome.TOO_LATE, None, newest=False)


def test_a_late_sample_counts_but_does_not_become_the_newest() -> None:
    windows = TokenWindows(300)
    applied(windows, volume=1.0, market_cap=10.0)
    applied(windows, ts=T0 + timedelta(hours=2), volume=3.0, market_cap=10.0)
    late = applied(windows, ts=T0 + timedelta(minutes=90), volume=2.0, market_cap=10.0)
    assert late.outcome is AddOutcome.ACCEPTED and not late.newest
    assert late.sample is not None
    assert late.sample.ts == T0 + timedelta(minutes=90)
    # The windows end at the newest sample (T0 + 2 h): the late one is in its 1 h window.
    assert late.sample.velocity_1h == pytest.approx(0.25)
    assert late.sample.velocity_4h == pytest.approx(0.2)
    # Its trend looks at what came before it in event time: one sample only.
    assert late.sample.trend == "insufficient_data"


def test_trend_compares_with_the_last_three_computable_samples() -> None:
    windows = TokenWindows(300)
    for step, volume in enumerate([1.0, 1.0, None, 1.0, 1.0, 1.2]):
        result = applied(
            windows, ts=T0 + timedelta(minutes=5 * step), volume=volume, market_cap=10.0
        )
    assert result.sample is not None
    assert result.sample.trend == "increasing"
    assert result.sample.trend_recent_avg == pytest.approx(0.1)


def test_freshness_is_judged_at_the_listing_time_not_the_wall_clock() -> None:
    windows = TokenWindows(300)
    stale = applied(windows, listed_at=T0 + timedelta(hours=2)).sample
    assert stale is not None
    assert "stale" in stale.quality_flags
    assert stale.data_quality_score < 1.0


def test_a_velocity_outlier_against_the_token_history_is_flagged() -> None:
    windows = TokenWindows(300)
    for step in range(10):
        result = applied(windows, ts=T0 + timedelta(minutes=5 * step), volume=1.0 + step / 100)
    spike = applied(windows, ts=T0 + timedelta(minutes=50), volume=68_567_694_895)
    assert result.sample is not None and "velocity_outlier" not in result.sample.quality_flags
    assert spike.sample is not None and spike.sample.velocity == 1.0
    assert "velocity_outlier" in spike.sample.quality_flags


def test_the_velocity_is_capped_at_100() -> None:
    sample = applied(TokenWindows(300), volume=1790 * 2_500_000, market_cap=2_500_000).sample
    assert sample is not None and sample.velocity == sample.velocity_1h == 100.0


def test_milliseconds_of_last_updated_are_kept() -> None:
    ts = T0 + timedelta(milliseconds=250)
    sample = applied(TokenWindows(300), ts=ts).sample
    assert sample is not None and sample.ts == ts and cmc_time(ts).endswith(".250Z")


def test_the_encoded_sample_is_what_encoding_the_model_writes() -> None:
    # apply() builds the sample as the model's dumped fields and serializes them itself.
    windows = TokenWindows(300)
    variants: list[dict[str, Any]] = [
        {},
        {"version": "v1", "volume": 12, "market_cap": 3},  # ints stay ints
        {"volume": None, "price": None},  # not computable, fields missing
        {"market_cap": 0},
        {"circulating_supply": 589_247_012_435_018, "price": 5e-10, "cmc_rank": None},
        {"symbol": None, "name": None, "slug": None, "max_supply": None},
        {"polled_at": "2017-08-24T18:00:05"},  # no zone: read as UTC
        {"total_supply": 10**30, "max_supply": 2**64},  # beyond 64 bits: orjson refuses them
    ]
    for step, variant in enumerate(variants * 3):
        ts = T0 + timedelta(minutes=5 * step, milliseconds=step)
        result = applied(windows, ts=ts, **variant)
        assert result.fields is not None and result.sample is not None
        assert list(result.fields) == list(MetricsSample.model_fields)
        assert result.fields == result.sample.model_dump()
        assert result.encoded() == encode(result.sample)
    late = applied(windows, ts=T0 + timedelta(minutes=7))
    assert late.sample is not None and not late.newest
    assert late.encoded() == encode(late.sample)


def test_an_observation_without_a_sample_has_nothing_to_encode() -> None:
    windows = TokenWindows(300)
    applied(windows)
    duplicate = applied(windows)
    assert duplicate.sample is None
    with pytest.raises(ValueError, match="duplicate"):
        duplicate.encoded()
