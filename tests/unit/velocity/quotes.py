"""Raw quote messages for the velocity unit tests, shaped like the real CMC answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tokvel_common.serialization import dumps, encode_key

T0 = datetime(2017, 8, 24, 12, 0, 5, tzinfo=UTC)


def cmc_time(ts: datetime) -> str:
    """CMC's timestamp format: UTC, milliseconds, ``Z``."""
    return f"{ts.astimezone(UTC):%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z"


def quote(
    cmc_id: int = 1,
    *,
    ts: datetime = T0,
    price: float | None = 4149.94,
    volume: float | None = 2_376_000_000,
    market_cap: float | None = 68_567_694_895,
    listed_at: datetime | None = None,
    version: str = "v3",
    **entry: Any,
) -> dict[str, Any]:
    """One cmc.quotes.raw value (a listing entry + polled_at, source, poll_id, listed_at)."""
    usd = {
        "price": price,
        "volume_24h": volume,
        "market_cap": market_cap,
        "percent_change_1h": 0.15,
        "percent_change_24h": 1.68,
        "percent_change_7d": -4.08,
        "last_updated": cmc_time(ts),
    }
    listed = listed_at or ts
    return {
        "id": cmc_id,
        "name": f"Token {cmc_id}",
        "symbol": f"T{cmc_id}",
        "slug": f"token-{cmc_id}",
        "cmc_rank": 1,
        "circulating_supply": 16_522_575,
        "total_supply": None,
        "max_supply": 21_000_000,
        "last_updated": cmc_time(ts),
        "quote": [{"id": 2781, "symbol": "USD", **usd}] if version == "v3" else {"USD": usd},
        "polled_at": cmc_time(listed + timedelta(seconds=1)),
        "source": "test",
        "poll_id": "poll-1",
        "listed_at": cmc_time(listed),
        **entry,
    }


def message(value: dict[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka record the ingestor would publish."""
    return encode_key(value["id"]), dumps(value)
