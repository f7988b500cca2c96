"""What the repository sends to PostgreSQL: exact numbers, one row per token where required."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson

from tokvel_common.events import MetricsSample, TokenInfo, WindowCoverage
from writer.repository import (
    METRIC_COLUMNS,
    copy_line,
    newest_info_per_token,
    newest_per_token,
)

T0 = datetime(2017, 8, 10, tzinfo=UTC)


def _sample(cmc_id: int = 5, ts: datetime = T0, **changes: object) -> MetricsSample:
    fields: dict[str, object] = {
        "cmc_id": cmc_id, "symbol": "SHIB", "name": "Shiba", "slug": "shiba", "ts": ts,
        "price_usd": 8.5e-10, "market_cap_usd": 0, "volume_24h_usd": None,
        "circulating_supply": 589_246_388_908_467, "total_supply": 10**15 + 1, "max_supply": None,
        "percent_change_1h": 1234567.891, "percent_change_24h": None, "percent_change_7d": None,
        "velocity": 0.0, "velocity_1h": 0.1 + 0.2, "velocity_4h": None, "velocity_12h": None,
        "velocity_24h": 0.0, "velocity_7d": None,
        "coverage": {"1h": WindowCoverage(points_used=3, points_expected=12)},
        "trend": "insufficient_data", "trend_recent_avg": None, "data_quality_score": 0.35,
        "quality_flags": ["volume_missing"], "polled_at": T0 + timedelta(seconds=3),
    }  # fmt: skip
    fields.update(changes)
    return MetricsSample.model_validate(fields)


def _copy_fields(sample: MetricsSample) -> dict[str, str]:
    """The COPY text line's fields by column (the token id, which the line lacks, aside)."""
    return dict(zip(METRIC_COLUMNS[1:], copy_line(sample).split("\t"), strict=True))


def test_copy_line_writes_every_number_exactly() -> None:
    fields = _copy_fields(_sample())
    assert Decimal(fields["price_usd"]) == Decimal("8.5E-10")  # written 8.5e-10
    assert fields["circulating_supply"] == "589246388908467"
    assert fields["total_supply"] == str(10**15 + 1)
    assert fields["market_cap_usd"] == "0"
    assert fields["volume_24h_usd"] == "\\N"  # NULL
    assert fields["percent_change_1h"] == "1234567.891"
    assert float(fields["velocity_1h"]) == 0.1 + 0.2  # double precision column: bit for bit
    assert fields["velocity_1h"] == "0.30000000000000004"
    assert fields["data_quality_score"] == "0.35"
    assert fields["timestamp"] == "2017-08-10T00:00:00+00:00"
    assert fields["quality_flags"] == '{"volume_missing"}'
    assert fields["trend"] == "insufficient_data"
    details = orjson.loads(fields["details"])
    assert details["coverage"] == {"1h": {"points_used": 3, "points_expected": 12}}
    assert details["polled_at"] == "2017-08-10T00:00:03+00:00"


def test_copy_line_writes_integers_of_any_size_in_full() -> None:
    fields = _copy_fields(_sample(total_supply=10**30 + 7, circulating_supply=-(2**63)))
    assert fields["total_supply"] == str(10**30 + 7)
    assert fields["circulating_supply"] == str(-(2**63))
    assert Decimal(fields["price_usd"]) == Decimal("8.5E-10")


def test_copy_line_escapes_text_so_that_no_value_breaks_the_row() -> None:
    flags = ['quo"te', "back\\slash", "tab\there", "new\nline", "NULL", ""]
    line = copy_line(_sample(quality_flags=flags))
    assert "\n" not in line and "\r" not in line
    fields = _copy_fields(_sample(quality_flags=flags))
    # COPY text unescapes \\ to \, then the array literal reads quoted, backslash-escaped items.
    assert fields["quality_flags"] == (
        '{"quo\\\\"te","back\\\\\\\\slash","tab\\there","new\\nline","NULL",""}'
    )


def test_newest_per_token_keeps_the_latest_event_time_whatever_the_order() -> None:
    late = _sample(ts=T0 + timedelta(minutes=5), price_usd=2.0)
    early = _sample(ts=T0, price_usd=1.0)
    other = _sample(cmc_id=1, ts=T0)
    assert newest_per_token([late, other, early]) == [other, late]


def test_newest_info_per_token_keeps_the_latest_fetched() -> None:
    old = TokenInfo(cmc_id=1, name="old", fetched_at=T0)
    new = TokenInfo(cmc_id=1, name="new", fetched_at=T0 + timedelta(days=1))
    assert newest_info_per_token([new, old]) == [new]
