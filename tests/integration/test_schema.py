"""Migrations and schema against a real PostgreSQL: idempotence, partitions, exact numbers."""

from __future__ import annotations

import gzip
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import orjson
import pytest

from tokvel_common.db.codecs import as_numeric
from tokvel_common.db.migrate import MigrationError, apply_migrations, load_migrations
from tokvel_common.paths import SHARED_DATA_DIR

pytestmark = pytest.mark.integration

NUMERIC_FIELDS = (
    "price_usd",
    "market_cap_usd",
    "volume_24h_usd",
    "circulating_supply",
    "total_supply",
    "max_supply",
    "percent_change_1h",
    "percent_change_24h",
    "percent_change_7d",
)
RECORDED_FILES = sorted(SHARED_DATA_DIR.glob("cmc-web-2017-*.jsonl.gz"))

INSERT_TOKEN = "INSERT INTO tokens (cmc_id, symbol, name) VALUES ($1, $2, $3) RETURNING id"
INSERT_METRIC = f"""
INSERT INTO token_metrics (token_id, "timestamp", {", ".join(NUMERIC_FIELDS)},
                           velocity, velocity_24h, trend, data_quality_score)
VALUES ($1, $2, {", ".join(f"${i}" for i in range(3, 3 + len(NUMERIC_FIELDS)))},
        0, 0, 'insufficient_data', 1)
ON CONFLICT (token_id, "timestamp") DO NOTHING
"""
SELECT_METRIC = f"""
SELECT {", ".join(NUMERIC_FIELDS)} FROM token_metrics WHERE token_id = $1 AND "timestamp" = $2
"""


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def test_migrations_on_an_empty_database_twice(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        first = await apply_migrations(conn)
        second = await apply_migrations(conn)
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        partitioned = await conn.fetchval(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'token_metrics'::regclass"
        )
    finally:
        await conn.close()
    assert [m.version for m in first] == [m.version for m in load_migrations()]
    assert second == []
    assert {"tokens", "token_metrics", "api_keys", "rate_limiting", "schema_migrations"} <= tables
    assert partitioned == b"r"  # "char" comes back as bytes


async def test_a_changed_migration_is_refused(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        migrations = load_migrations()
        await apply_migrations(conn, migrations)
        tampered = [replace(migrations[0], sql=migrations[0].sql + "\n-- edited")]
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await apply_migrations(conn, tampered)
    finally:
        await conn.close()


async def test_daily_partitions_are_created_once_and_route_rows(
    conn: asyncpg.Connection,
) -> None:
    created = await conn.fetchval("SELECT tokvel_ensure_partitions($1, 3)", date(2017, 8, 10))
    again = await conn.fetchval("SELECT tokvel_ensure_partitions($1, 3)", date(2017, 8, 10))
    assert (created, again) == (3, 0)
    token_id = await conn.fetchval(INSERT_TOKEN, 1, "BTC", "Bitcoin")
    ts = datetime(2017, 8, 11, 23, 59, 59, tzinfo=UTC)
    await conn.execute(INSERT_METRIC, token_id, ts, *([1] * len(NUMERIC_FIELDS)))
    where = await conn.fetchval(
        'SELECT tableoid::regclass::text FROM token_metrics WHERE "timestamp" = $1', ts
    )
    assert where == "token_metrics_p20170811"
    with pytest.raises(asyncpg.CheckViolationError):  # no partition: refused, never misplaced
        await conn.execute(
            INSERT_METRIC, token_id, ts + timedelta(days=5), *([1] * len(NUMERIC_FIELDS))
        )
    dropped = await conn.fetch("SELECT tokvel_drop_partitions_before($1)", date(2017, 8, 11))
    assert [r[0] for r in dropped] == ["token_metrics_p20170810"]


async def test_a_redelivered_row_is_not_duplicated(conn: asyncpg.Connection) -> None:
    await conn.fetchval("SELECT tokvel_ensure_partitions($1, 1)", date(2017, 8, 10))
    token_id = await conn.fetchval(INSERT_TOKEN, 1027, "ETH", "Ethereum")
    ts = datetime(2017, 8, 10, 0, 0, 5, tzinfo=UTC)
    for _ in range(3):
        await conn.execute(INSERT_METRIC, token_id, ts, *([2] * len(NUMERIC_FIELDS)))
    assert await conn.fetchval("SELECT count(*) FROM token_metrics") == 1


def _recorded_rows(path: Path) -> Iterator[dict[str, object]]:
    with gzip.open(path, "rb") as lines:
        for line in lines:
            yield orjson.loads(line)


def _recorded_extremes() -> dict[str, list[int | float]]:
    """The smallest non-zero, the largest and the most negative value of every numeric field."""
    lows: dict[str, int | float] = {}
    highs: dict[str, int | float] = {}
    negatives: dict[str, int | float] = {}
    for path in RECORDED_FILES:
        for row in _recorded_rows(path):
            for field in NUMERIC_FIELDS:
                value = row[field]
                if not isinstance(value, int | float):
                    continue
                if value > 0 and (field not in lows or value < lows[field]):
                    lows[field] = value
                if field not in highs or value > highs[field]:
                    highs[field] = value
                if value < 0 and (field not in negatives or value < negatives[field]):
                    negatives[field] = value
    return {
        field: [d[field] for d in (lows, highs, negatives) if field in d]
        for field in NUMERIC_FIELDS
    }


# Today's CMC magnitudes that the 2017 recording does not have (data README, ARCHITECTURE.md).
TODAYS_EXTREMES: dict[str, list[int | float]] = {
    "price_usd": [2.1e-10, 9.87654321e-12, 1.2345678901234567e-15, 108_000.12345678],
    "market_cap_usd": [0, 0.0, 2_134_567_890_123.4567],
    "volume_24h_usd": [0, 293_137_000_000, 98_765_432_109_876.54],
    "circulating_supply": [589_247_172_066_163, 589_247_172_066_163.7, 10**18, 2**63 - 1],
    "total_supply": [999_982_367_236_863.2, 10**15],
    "max_supply": [1_000_000_000_000_000, 21_000_000],
    "percent_change_1h": [-99.99999999, 1_234_567.891],
    "percent_change_24h": [1_500_000.5, -100],
    "percent_change_7d": [25_000_000.12345678, -99.9],
}


async def test_real_extremes_are_read_back_equal(conn: asyncpg.Connection) -> None:
    assert RECORDED_FILES, f"no recorded data in {SHARED_DATA_DIR}"
    recorded = _recorded_extremes()
    # The glitches the data README names must be among what we store.
    assert recorded["price_usd"][1] >= 349_748
    assert recorded["volume_24h_usd"][1] >= 293_137_000_000
    assert math.isclose(recorded["price_usd"][0], 5e-8, rel_tol=0.5)

    cases: list[tuple[str, int | float | None]] = [
        (f, v) for f, values in recorded.items() for v in values
    ]
    cases += [(f, v) for f, values in TODAYS_EXTREMES.items() for v in values]
    cases += [(f, None) for f in NUMERIC_FIELDS]  # nulls stay null

    day = date(2017, 8, 10)
    await conn.fetchval("SELECT tokvel_ensure_partitions($1, 1)", day)
    token_id = await conn.fetchval(INSERT_TOKEN, 5994, "SHIB", "Shiba Inu")
    start = datetime(2017, 8, 10, tzinfo=UTC)
    for i, (field, value) in enumerate(cases):
        ts = start + timedelta(seconds=i)
        args = [as_numeric(value) if f == field else None for f in NUMERIC_FIELDS]
        await conn.execute(INSERT_METRIC, token_id, ts, *args)
        row = await conn.fetchrow(SELECT_METRIC, token_id, ts)
        assert row is not None
        stored: Decimal | None = row[field]
        if value is None:
            assert stored is None
            continue
        assert stored is not None, (field, value)
        assert stored == Decimal(repr(value) if isinstance(value, float) else value), (field, value)
        # What a reader gets back is the very double (or int) that was sent.
        back: int | float = int(stored) if isinstance(value, int) else float(stored)
        assert back == value and type(back) is type(value), (field, value, stored)
