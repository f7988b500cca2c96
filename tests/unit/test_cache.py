"""The Redis cache contract of tokvel_common.cache: keys, TTLs, codec, list-page invalidation."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime

import pytest

from tokvel_common.cache import (
    COMPRESSION_THRESHOLD_BYTES,
    TOKEN_TTL_SECONDS,
    VELOCITY_TIMEFRAMES,
    VELOCITY_TTL_SECONDS,
    ZLIB_MARKER,
    CacheChange,
    TokenMetadata,
    TokenSnapshot,
    access_bucket_key,
    decode_value,
    encode_page_ids,
    list_page_key,
    list_pages_to_drop,
    recent_access_bucket_keys,
    snapshot_entries,
    token_key,
    velocity_key,
    velocity_snapshot,
)
from tokvel_common.events import MetricsSample, WindowCoverage


def _sample(**changes: object) -> MetricsSample:
    fields: dict[str, object] = {
        "cmc_id": 1027,
        "symbol": "ETH",
        "name": "Ethereum",
        "slug": "ethereum",
        "ts": datetime(2017, 8, 10, 0, 0, 5, tzinfo=UTC),
        "price_usd": 296.4,
        "market_cap_usd": 27829034709,
        "volume_24h_usd": 2640610000,
        "circulating_supply": 93891398,
        "total_supply": None,
        "max_supply": None,
        "percent_change_1h": 0.08,
        "percent_change_24h": -0.75,
        "percent_change_7d": 34.04,
        "velocity": 0.09488693,
        "velocity_1h": 0.091,
        "velocity_4h": 0.092,
        "velocity_12h": None,
        "velocity_24h": 0.09488693,
        "velocity_7d": 0.1,
        "coverage": {"1h": WindowCoverage(points_used=12, points_expected=12)},
        "trend": "stable",
        "data_quality_score": 0.9,
        "quality_flags": ["stale"],
    }
    fields.update(changes)
    return MetricsSample.model_validate(fields)


def _snapshot(description: str | None = None) -> TokenSnapshot:
    token = TokenMetadata(cmc_id=1027, symbol="ETH", name="Ethereum", description=description)
    return TokenSnapshot(token=token, metrics=_sample())


def test_key_names_are_the_seeds() -> None:
    assert token_key(1) == "token:1"
    assert velocity_key(1, "24h") == "velocity:1:24h"
    assert list_page_key("market_cap", 100, 0) == "tokens:list:market_cap:100:0"
    assert (TOKEN_TTL_SECONDS, VELOCITY_TTL_SECONDS) == (60, 300)


def test_small_values_are_plain_json_and_large_ones_compressed() -> None:
    small = _snapshot()
    encoded = snapshot_entries(small)[0][1]
    assert encoded.startswith(b"{")
    assert decode_value(encoded, TokenSnapshot) == small

    large = _snapshot(description="Ethereum is a decentralized platform. " * 100)
    encoded = snapshot_entries(large)[0][1]
    assert encoded[:1] == ZLIB_MARKER
    assert len(encoded) < COMPRESSION_THRESHOLD_BYTES
    assert decode_value(encoded, TokenSnapshot) == large
    # The format is documented: marker byte, then a plain zlib stream of the JSON.
    assert zlib.decompress(encoded[1:]).startswith(b'{"token":')


def test_entries_cover_the_token_key_and_every_timeframe_with_their_ttls() -> None:
    entries = snapshot_entries(_snapshot())
    assert [(key, ttl) for key, _, ttl in entries] == [
        ("token:1027", 60),
        *((f"velocity:1027:{tf}", 300) for tf in VELOCITY_TIMEFRAMES),
    ]


@pytest.mark.parametrize(
    ("timeframe", "value", "coverage"),
    [
        ("1h", 0.091, WindowCoverage(points_used=12, points_expected=12)),
        ("4h", 0.092, None),
        ("12h", None, None),
        ("24h", 0.09488693, None),
        ("7d", 0.1, None),
    ],
)
def test_velocity_snapshot_carries_its_window_and_all_the_others(
    timeframe: str, value: float | None, coverage: WindowCoverage | None
) -> None:
    snap = velocity_snapshot(_sample(), timeframe)  # type: ignore[arg-type]  # parametrized
    assert (snap.velocity, snap.coverage) == (value, coverage)
    assert snap.velocity_24h == 0.09488693 and snap.velocity_7d == 0.1
    assert snap.trend == "stable" and snap.calculated_at == _sample().ts


def test_new_samples_drop_every_metric_sorted_page_and_metadata_pages_holding_the_token() -> None:
    index: dict[bytes | str, bytes | str] = {
        b"tokens:list:velocity:10:0": encode_page_ids([1, 2]),
        b"tokens:list:market_cap:10:10": encode_page_ids([7, 8]),
        b"tokens:list:symbol:10:0": encode_page_ids([1, 2]),
        b"tokens:list:symbol:10:10": encode_page_ids([7, 8]),
    }
    dropped = list_pages_to_drop(index, CacheChange(metrics={1}))
    assert sorted(dropped) == [
        b"tokens:list:market_cap:10:10",
        b"tokens:list:symbol:10:0",
        b"tokens:list:velocity:10:0",
    ]


def test_metadata_changes_and_new_tokens_drop_every_metadata_sorted_page() -> None:
    index: dict[bytes | str, bytes | str] = {
        b"tokens:list:velocity:10:0": encode_page_ids([1, 2]),
        b"tokens:list:name:10:10": encode_page_ids([7, 8]),
    }
    assert list_pages_to_drop(index, CacheChange(tokens_added=True)) == [b"tokens:list:name:10:10"]
    assert sorted(list_pages_to_drop(index, CacheChange(metadata={2}))) == [
        b"tokens:list:name:10:10",
        b"tokens:list:velocity:10:0",
    ]
    assert list_pages_to_drop(index, CacheChange()) == []


def test_access_buckets_are_five_minutes_wide() -> None:
    assert access_bucket_key(600) == access_bucket_key(899) == "token_access:2"
    assert recent_access_bucket_keys(900) == ("token_access:3", "token_access:2")
