"""The wire models against the untouched real CMC answers and the v3 shape."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tokvel_common.events import CmcListingEntry, CmcListingsResponse, MetricsSample, RawQuote
from tokvel_common.paths import SHARED_DATA_DIR
from tokvel_common.serialization import DecodeError, decode, dumps, encode, loads

PRO_API_DIR = SHARED_DATA_DIR / "cmc-pro-api"
REAL_ANSWERS = sorted(PRO_API_DIR.glob("listings_v1_*.json"))


def test_the_real_answers_are_there() -> None:
    assert len(REAL_ANSWERS) == 2, f"expected two recorded answers in {PRO_API_DIR}"


@pytest.mark.parametrize("path", REAL_ANSWERS, ids=lambda p: Path(p).name)
def test_v1_real_answer_parses_with_every_value_as_received(path: Path) -> None:
    raw = json.loads(path.read_text())
    parsed = CmcListingsResponse.model_validate(raw)

    assert parsed.status.error_code == 0
    assert parsed.status.total_count is not None and parsed.status.total_count > 3000
    assert len(parsed.data) == len(raw["data"]) == 100
    for entry, original in zip(parsed.data, raw["data"], strict=True):
        usd = entry.quote_in("USD")
        assert usd is not None
        assert entry.id == original["id"]
        # Values are kept exactly, ints as ints and doubles as doubles, nulls as None.
        for field in ("circulating_supply", "total_supply", "max_supply"):
            assert getattr(entry, field) == original[field]
            assert type(getattr(entry, field)) is type(original[field])
        for field in ("price", "volume_24h", "market_cap", "percent_change_1h"):
            assert getattr(usd, field) == original["quote"]["USD"][field]
        assert entry.event_time() == usd.last_updated
        assert entry.event_time() is not None and entry.event_time().tzinfo is UTC  # type: ignore[union-attr]


def _as_v3(entry: dict[str, object]) -> dict[str, object]:
    """The same entry in the v3 shape: ``quote`` a list of currency objects."""
    quote = entry["quote"]
    assert isinstance(quote, dict)
    converted = dict(entry)
    converted["quote"] = [{"id": 2781, "symbol": cur, **q} for cur, q in quote.items()]
    return converted


def test_v3_and_v1_shapes_give_the_same_usd_quote() -> None:
    raw = json.loads(REAL_ANSWERS[-1].read_text())["data"]
    for original in raw[:20]:
        v1 = CmcListingEntry.model_validate(original)
        v3 = CmcListingEntry.model_validate(_as_v3(original))
        assert isinstance(v3.quote, list)
        assert v1.quote_in("USD") is not None
        v1_usd, v3_usd = v1.quote_in("USD"), v3.quote_in("USD")
        assert v1_usd is not None and v3_usd is not None
        assert v1_usd.price == v3_usd.price
        assert v3_usd.id == 2781
        assert v1.event_time() == v3.event_time()
        assert v3.quote_in("EUR") is None


def test_nulls_and_real_extremes_survive_a_round_trip() -> None:
    entry = {
        "id": 5994,
        "name": "Shiba Inu",
        "symbol": "SHIB",
        "slug": "shiba-inu",
        "circulating_supply": 589_247_172_066_163,
        "total_supply": 589_536_392_347_953.2,
        "max_supply": None,
        "last_updated": "2024-05-01T12:00:00.000Z",
        "quote": [
            {
                "id": 2781,
                "symbol": "USD",
                "price": 2.1e-10,
                "volume_24h": 0,
                "market_cap": 0,
                "percent_change_24h": 1_234_567.891,
                "last_updated": "2024-05-01T12:00:00.000Z",
            }
        ],
        "some_future_cmc_field": {"kept": True},
    }
    raw = RawQuote.model_validate(
        {**entry, "polled_at": "2024-05-01T12:00:05Z", "source": "test", "poll_id": "p1"}
    )
    again = decode(encode(raw), RawQuote)
    assert again == raw
    usd = again.quote_in("USD")
    assert usd is not None
    assert usd.price == 2.1e-10 and usd.market_cap == 0 and usd.percent_change_24h == 1_234_567.891
    assert again.circulating_supply == 589_247_172_066_163
    assert isinstance(again.circulating_supply, int)
    assert again.max_supply is None
    assert again.model_extra == {"some_future_cmc_field": {"kept": True}}


def test_integers_beyond_64_bits_stay_exact_on_the_wire() -> None:
    # orjson alone would turn these into floats (reading) or refuse them (writing).
    huge = 2**70 + 1
    body = (
        b'{"id": 1, "total_supply": %d, "max_supply": -%d, "last_updated": "2024-05-01T12:00:00Z"}'
    )
    entry = decode(body % (huge, huge), CmcListingEntry)
    assert entry.total_supply == huge and isinstance(entry.total_supply, int)
    assert entry.max_supply == -huge
    raw = RawQuote.model_validate(
        {**entry.model_dump(), "polled_at": "2024-05-01T12:00:05Z", "source": "t", "poll_id": "p"}
    )
    again = decode(encode(raw), RawQuote)
    assert again.total_supply == huge and again.max_supply == -huge
    document = {"data": [{"id": 1, "total_supply": huge, "price": 2.1e-10}]}
    assert loads(dumps(document)) == document
    assert loads(b"[9223372036854775807, 1.5]") == [2**63 - 1, 1.5]


@pytest.mark.parametrize(
    "payload", [b'{"id": 1, "x": NaN}', b'{"id": 12345678901234567890, "x": Infinity}']
)
def test_non_numbers_are_refused_on_both_parsing_paths(payload: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(payload, CmcListingEntry)
    assert caught.value.reason == "invalid_json"


def test_naive_timestamps_are_read_as_utc() -> None:
    entry = CmcListingEntry.model_validate({"id": 1, "last_updated": "2017-08-10T00:00:05"})
    assert entry.last_updated == datetime(2017, 8, 10, 0, 0, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"id": "one"}', "schema_violation"),
        (b'{"name": "no id"}', "schema_violation"),
        (b'{"id": 1, "quote": {"USD": {"price": "cheap"}}}', "schema_violation"),
    ],
)
def test_bad_messages_are_decode_errors_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(payload, CmcListingEntry)
    assert caught.value.reason == reason


def test_metrics_sample_rejects_a_score_out_of_range() -> None:
    with pytest.raises(ValueError, match="data_quality_score"):
        MetricsSample.model_validate(
            {
                "cmc_id": 1, "symbol": "BTC", "name": "Bitcoin", "slug": "bitcoin",
                "ts": "2017-08-10T00:00:05Z", "price_usd": 1, "market_cap_usd": 1,
                "volume_24h_usd": 1, "circulating_supply": 1, "total_supply": None,
                "max_supply": None, "percent_change_1h": None, "percent_change_24h": None,
                "percent_change_7d": None, "velocity": 1.0, "velocity_1h": None,
                "velocity_4h": None, "velocity_12h": None, "velocity_24h": 1.0,
                "velocity_7d": None, "coverage": {}, "trend": "stable",
                "data_quality_score": 1.5, "quality_flags": [],
            }
        )  # fmt: skip
