"""Every SQL statement of the gateway (named constants, ``$n`` parameters) and the calls.

asyncpg prepares each statement on first use per connection and keeps it in its statement cache,
so every hot query runs as a prepared statement. Plans are pinned by tests
(``tests/integration/gateway/test_query_plans.py``): ``token_metrics`` is only ever read through
an index of the partitions its time range selects, never scanned.

Key lookups use :data:`tokvel_common.apikeys.SELECT_KEY_BY_HASH`, shared with the WebSocket
broadcaster.

Any failure to reach PostgreSQL, or an answer slower than ``DB_TIMEOUT_SECONDS``, becomes
:class:`~api_gateway.errors.DatabaseUnavailable` (503 for the client).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg

from api_gateway.errors import DatabaseUnavailable
from api_gateway.models import (
    Fill,
    HistoryPoint,
    Interval,
    Order,
    SortField,
    SymbolMatch,
    TokenSummary,
)
from tokvel_common.apikeys import SELECT_KEY_BY_HASH
from tokvel_common.cache import TokenMetadata, TokenSnapshot
from tokvel_common.events import MetricsSample
from tokvel_common.keylookup import KeyRecord

PING: Final = "SELECT 1"

# ---------------------------------------------------------------------------- token snapshots

SELECT_BY_CMC_ID: Final = """
SELECT t.id, t.cmc_id, t.symbol, t.name, t.slug, t.cmc_rank, t.description, t.logo_url,
       t.website_url, t.twitter_url, t.reddit_url, t.github_url, t.whitepaper_url, t.date_added,
       t.is_active, t.updated_at, l."timestamp" AS latest_ts, l.sample
FROM tokens t
LEFT JOIN token_latest l ON l.token_id = t.id
WHERE t.cmc_id = $1
"""

# ------------------------------------------------------------------------------ token ranking

# A token is listed while its newest sample is at most this much older than the ranking's
# snapshot time (the newest sample of all): tokens CMC stopped listing drop out.
LISTING_WINDOW: Final = timedelta(days=1)

SORT_COLUMNS: Final[Mapping[SortField, str]] = {
    "market_cap": "market_cap_usd",
    "volume_24h": "volume_24h_usd",
    "velocity": "velocity",
    "velocity_7d": "velocity_7d",
    "price": "price_usd",
    "percent_change_24h": "percent_change_24h",
    "symbol": "symbol",
    "name": "name",
    "rank": "cmc_rank",
}
DEFAULT_ORDER: Final[Mapping[SortField, Order]] = {
    sort: ("asc" if sort in ("symbol", "name", "rank") else "desc") for sort in SORT_COLUMNS
}

# Both rankings produce these columns; the ORDER BY below applies to either.
_RANKED_SELECT: Final = """
SELECT listed.*, count(*) OVER () AS total, max(listed.ts) OVER () AS snapshot
FROM listed
ORDER BY {column} {direction} NULLS LAST, cmc_id ASC
LIMIT $1 OFFSET $2
"""

# The current ranking: one row per token (token_latest), no history read.
_LIST_LATEST: Final = """
WITH newest AS (
    SELECT max(l."timestamp") AS ts
    FROM token_latest l JOIN tokens t ON t.id = l.token_id
    WHERE t.is_active
), listed AS (
    SELECT t.cmc_id, t.symbol, t.name, t.slug, l.cmc_rank, l."timestamp" AS ts,
           (l.sample ->> 'price_usd')::numeric AS price_usd,
           l.market_cap_usd,
           (l.sample ->> 'volume_24h_usd')::numeric AS volume_24h_usd,
           (l.sample ->> 'percent_change_24h')::numeric AS percent_change_24h,
           (l.sample ->> 'velocity')::numeric AS velocity,
           (l.sample ->> 'velocity_7d')::float8 AS velocity_7d,
           l.sample ->> 'trend' AS trend,
           (l.sample ->> 'data_quality_score')::numeric AS data_quality_score
    FROM token_latest l
    JOIN tokens t ON t.id = l.token_id
    CROSS JOIN newest
    WHERE t.is_active AND l."timestamp" > newest.ts - $3::interval
)
"""

# The ranking as it was at $3: each token's newest sample in ($4, $3], one index probe per
# token into the partitions of that range (pruned by the bounds, which are parameters).
_LIST_AS_OF: Final = """
WITH listed AS (
    SELECT t.cmc_id, t.symbol, t.name, t.slug, m.cmc_rank, m.ts, m.price_usd, m.market_cap_usd,
           m.volume_24h_usd, m.percent_change_24h, m.velocity, m.velocity_7d, m.trend,
           m.data_quality_score
    FROM tokens t
    CROSS JOIN LATERAL (
        SELECT m."timestamp" AS ts, m.cmc_rank, m.price_usd, m.market_cap_usd, m.volume_24h_usd,
               m.percent_change_24h, m.velocity, m.velocity_7d, m.trend, m.data_quality_score
        FROM token_metrics m
        WHERE m.token_id = t.id AND m."timestamp" <= $3 AND m."timestamp" > $4
        ORDER BY m."timestamp" DESC
        LIMIT 1
    ) m
    WHERE t.is_active
)
"""


def _ranked(prefix: str) -> dict[tuple[SortField, Order], str]:
    return {
        (sort, order): prefix + _RANKED_SELECT.format(column=column, direction=order.upper())
        for sort, column in SORT_COLUMNS.items()
        for order in ("asc", "desc")
    }


# One constant per (sort, order): ORDER BY cannot be a parameter; the column names come from
# the whitelist above, never from the request.
LIST_LATEST: Final = _ranked(_LIST_LATEST)
LIST_AS_OF: Final = _ranked(_LIST_AS_OF)

# ----------------------------------------------------------------------------------- history

_HISTORY_RAW_COLUMNS: Final = """
    m."timestamp" AS ts, 1 AS samples, false AS interpolated, m.price_usd, m.market_cap_usd,
    m.volume_24h_usd, m.velocity, m.velocity AS velocity_min, m.velocity AS velocity_max,
    m.velocity_1h, m.velocity_4h, m.velocity_12h, m.velocity_7d, m.data_quality_score
"""

# $1 token id, [$2, $3) the range, $4 the page size.
HISTORY_RAW: Final = f"""
SELECT {_HISTORY_RAW_COLUMNS}
FROM token_metrics m
WHERE m.token_id = $1 AND m."timestamp" >= $2 AND m."timestamp" < $3
ORDER BY m."timestamp"
LIMIT $4
"""  # noqa: S608 - composed from constants only, never from input

# A sample's velocity counts only when it was computable (ARCHITECTURE.md: volume and a
# positive market cap); the others carry velocity 0 and would drag the mean down.
_COMPUTABLE: Final = "m.volume_24h_usd IS NOT NULL AND m.market_cap_usd > 0"
_BUCKETS: Final = f"""
SELECT date_bin($4::interval, m."timestamp", TIMESTAMPTZ '2000-01-01 00:00:00+00') AS ts,
       count(*) AS samples,
       avg(m.price_usd) AS price_usd,
       avg(m.market_cap_usd) AS market_cap_usd,
       avg(m.volume_24h_usd) AS volume_24h_usd,
       avg(m.velocity) FILTER (WHERE {_COMPUTABLE}) AS velocity,
       min(m.velocity) FILTER (WHERE {_COMPUTABLE}) AS velocity_min,
       max(m.velocity) FILTER (WHERE {_COMPUTABLE}) AS velocity_max,
       avg(m.velocity_1h) AS velocity_1h,
       avg(m.velocity_4h) AS velocity_4h,
       avg(m.velocity_12h) AS velocity_12h,
       avg(m.velocity_7d) AS velocity_7d,
       avg(m.data_quality_score) AS data_quality_score
FROM token_metrics m
WHERE m.token_id = $1 AND m."timestamp" >= $2 AND m."timestamp" < $3
GROUP BY 1
"""  # noqa: S608 - composed from constants only, never from input

# $1 token id, [$2, $3) the range (bucket-aligned), $4 the bucket, $5 the page size.
HISTORY_BUCKETS: Final = f"""
SELECT b.ts, b.samples, false AS interpolated, b.price_usd, b.market_cap_usd, b.volume_24h_usd,
       b.velocity, b.velocity_min, b.velocity_max, b.velocity_1h, b.velocity_4h, b.velocity_12h,
       b.velocity_7d, b.data_quality_score
FROM ({_BUCKETS}) b
ORDER BY b.ts
LIMIT $5
"""  # noqa: S608 - composed from constants only, never from input

_INTERPOLATED: Final = (
    "price_usd",
    "market_cap_usd",
    "volume_24h_usd",
    "velocity",
    "velocity_1h",
    "velocity_4h",
    "velocity_12h",
    "velocity_7d",
)


def _linear(column: str) -> str:
    return (
        f"CASE WHEN f.samples IS NOT NULL THEN f.{column} "
        f"ELSE f.p_{column} + (f.n_{column} - f.p_{column}) "
        "* (extract(epoch FROM f.ts - f.p_ts) / extract(epoch FROM f.n_ts - f.p_ts)) "
        f"END AS {column}"
    )


# Every bucket of the range; an empty one between two buckets with data gets values on the
# straight line between them (interpolated = true). Empty buckets before the first or after the
# last bucket with data stay out: nothing is extrapolated. The neighbours are found with running
# counts: all rows sharing `gp` follow the same bucket with data, all sharing `gn` precede the
# same one. $1 token id, [$2, $3) the whole range (interpolation sees all of it), $4 the bucket,
# $5 the page size, $6 the page's first bucket.
HISTORY_FILLED: Final = f"""
WITH b AS ({_BUCKETS}),
grid AS (
    SELECT g.ts, b.samples, b.velocity_min, b.velocity_max, b.data_quality_score,
           {", ".join(f"b.{c}" for c in _INTERPOLATED)},
           count(b.samples) OVER (ORDER BY g.ts) AS gp,
           count(b.samples) OVER (ORDER BY g.ts DESC) AS gn
    FROM generate_series($2::timestamptz, $3::timestamptz - $4::interval, $4::interval) AS g(ts)
    LEFT JOIN b ON b.ts = g.ts
),
f AS (
    SELECT grid.*,
           first_value(grid.ts) OVER (PARTITION BY grid.gp ORDER BY grid.ts) AS p_ts,
           first_value(grid.ts) OVER (PARTITION BY grid.gn ORDER BY grid.ts DESC) AS n_ts,
           {
    ", ".join(
        f"first_value(grid.{c}) OVER (PARTITION BY grid.gp ORDER BY grid.ts) AS p_{c}, "
        f"first_value(grid.{c}) OVER (PARTITION BY grid.gn ORDER BY grid.ts DESC) AS n_{c}"
        for c in _INTERPOLATED
    )
}
    FROM grid
)
SELECT f.ts, COALESCE(f.samples, 0) AS samples, f.samples IS NULL AS interpolated,
       {", ".join(_linear(c) for c in _INTERPOLATED[:4])},
       f.velocity_min, f.velocity_max,
       {", ".join(_linear(c) for c in _INTERPOLATED[4:])},
       f.data_quality_score
FROM f
WHERE (f.samples IS NOT NULL OR (f.gp > 0 AND f.gn > 0)) AND f.ts >= $6
ORDER BY f.ts
LIMIT $5
"""  # noqa: S608 - composed from constants only, never from input

HISTORY_COLUMNS: Final = tuple(HistoryPoint.model_fields)

# ----------------------------------------------------------------------------------- symbols

SELECT_BY_SYMBOL: Final = """
SELECT t.cmc_id, t.symbol, t.name, t.slug, t.cmc_rank, t.is_active, l."timestamp" AS ts,
       (l.sample ->> 'price_usd')::numeric AS price_usd, l.market_cap_usd,
       (l.sample ->> 'velocity')::numeric AS velocity
FROM tokens t
LEFT JOIN token_latest l ON l.token_id = t.id
WHERE upper(t.symbol) = upper($1)
ORDER BY t.cmc_rank ASC NULLS LAST, t.cmc_id ASC
LIMIT $2
"""

# ------------------------------------------------------------------------------------- usage

# Adds the requests counted since the last flush to the month's usage and returns the totals,
# which include every other replica's flushes. Keys deleted meanwhile are skipped (their usage
# would violate the foreign key and block every later flush). Rows in key order: two replicas
# flushing the same keys lock them in the same order.
FLUSH_USAGE: Final = """
WITH counted AS (
    SELECT u.key_id, u.period_start, u.requests, u.last_used_at
    FROM unnest($1::bigint[], $2::date[], $3::bigint[], $4::timestamptz[])
        AS u (key_id, period_start, requests, last_used_at)
    WHERE EXISTS (SELECT 1 FROM api_keys k WHERE k.id = u.key_id)
    ORDER BY u.key_id, u.period_start
), usage AS (
    INSERT INTO rate_limiting AS r (api_key_id, period_start, usage_count, last_used_at)
    SELECT key_id, period_start, requests, last_used_at FROM counted
    ON CONFLICT (api_key_id, period_start) DO UPDATE
    SET usage_count = r.usage_count + EXCLUDED.usage_count,
        last_used_at = GREATEST(r.last_used_at, EXCLUDED.last_used_at)
    RETURNING r.api_key_id, r.period_start, r.usage_count
), touched AS (
    UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, c.last_used_at)
    FROM (SELECT key_id, max(last_used_at) AS last_used_at FROM counted GROUP BY key_id) c
    WHERE k.id = c.key_id
)
SELECT api_key_id, period_start, usage_count FROM usage
"""

UNAVAILABLE_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    # A pooled connection the server terminated (pg_terminate_backend, a restart) can fail its
    # next query with this (the protocol still consuming the server's error), not a
    # connection error.
    asyncpg.InternalClientError,
)


def to_number(value: Any) -> int | float | None:
    """A PostgreSQL numeric as the JSON number it came from: integral text -> int, else float."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        exponent = value.as_tuple().exponent
        return int(value) if isinstance(exponent, int) and exponent >= 0 else float(value)
    if isinstance(value, int | float):
        return value
    raise TypeError(f"not a number: {value!r}")


def to_float(value: Any) -> float | None:
    number = to_number(value)
    return None if number is None else float(number)


@dataclass(frozen=True)
class TokenRow:
    token_id: int
    metadata: TokenMetadata
    latest_ts: datetime | None
    snapshot: TokenSnapshot | None


@dataclass(frozen=True)
class Ranking:
    items: list[TokenSummary]
    total: int
    as_of: datetime | None


@dataclass(frozen=True)
class HistoryRange:
    token_id: int
    start: datetime
    end: datetime
    interval: Interval
    fill: Fill
    page_start: datetime  # the first point of this page (a cursor moves it forward)
    limit: int


INTERVALS: Final[Mapping[Interval, timedelta | None]] = {
    "raw": None,
    "5m": timedelta(minutes=5),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
}


def history_statement(query: HistoryRange) -> tuple[str, tuple[Any, ...]]:
    """The statement and arguments of one page of history."""
    bucket = INTERVALS[query.interval]
    if bucket is None:
        return HISTORY_RAW, (query.token_id, query.page_start, query.end, query.limit)
    if query.fill == "linear":
        return HISTORY_FILLED, (
            query.token_id,
            query.start,
            query.end,
            bucket,
            query.limit,
            query.page_start,
        )
    return HISTORY_BUCKETS, (query.token_id, query.page_start, query.end, bucket, query.limit)


def list_statement(
    sort: SortField, order: Order, limit: int, offset: int, as_of: datetime | None
) -> tuple[str, tuple[Any, ...]]:
    if as_of is None:
        return LIST_LATEST[sort, order], (limit, offset, LISTING_WINDOW)
    return LIST_AS_OF[sort, order], (limit, offset, as_of, as_of - LISTING_WINDOW)


def _summary(row: asyncpg.Record) -> TokenSummary:
    return TokenSummary(
        cmc_id=row["cmc_id"],
        symbol=row["symbol"],
        name=row["name"],
        slug=row["slug"],
        cmc_rank=row["cmc_rank"],
        ts=row["ts"],
        price_usd=to_number(row["price_usd"]),
        market_cap_usd=to_number(row["market_cap_usd"]),
        volume_24h_usd=to_number(row["volume_24h_usd"]),
        percent_change_24h=to_number(row["percent_change_24h"]),
        velocity=to_float(row["velocity"]) or 0.0,
        velocity_7d=to_float(row["velocity_7d"]),
        trend=row["trend"],
        data_quality_score=to_float(row["data_quality_score"]) or 0.0,
    )


def history_point(row: asyncpg.Record) -> HistoryPoint:
    return HistoryPoint(
        ts=row["ts"],
        samples=row["samples"],
        interpolated=row["interpolated"],
        price_usd=to_number(row["price_usd"]),
        market_cap_usd=to_number(row["market_cap_usd"]),
        volume_24h_usd=to_number(row["volume_24h_usd"]),
        velocity=to_float(row["velocity"]),
        velocity_min=to_float(row["velocity_min"]),
        velocity_max=to_float(row["velocity_max"]),
        velocity_1h=to_float(row["velocity_1h"]),
        velocity_4h=to_float(row["velocity_4h"]),
        velocity_12h=to_float(row["velocity_12h"]),
        velocity_7d=to_float(row["velocity_7d"]),
        data_quality_score=to_float(row["data_quality_score"]),
    )


_METADATA_FIELDS: Final = tuple(TokenMetadata.model_fields)


def _token_row(row: asyncpg.Record) -> TokenRow:
    metadata = TokenMetadata.model_validate({f: row[f] for f in _METADATA_FIELDS})
    snapshot = None
    if row["sample"] is not None:
        snapshot = TokenSnapshot(
            token=metadata, metrics=MetricsSample.model_validate_json(row["sample"])
        )
    return TokenRow(row["id"], metadata, row["latest_ts"], snapshot)


class GatewayRepository:
    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def _acquire(self) -> asyncpg.pool.PoolConnectionProxy:
        try:
            connection: asyncpg.pool.PoolConnectionProxy = await self._pool.acquire()
        except asyncpg.PostgresError as exc:
            # Refused while connecting (shutting down, not accepting connections, gone, bad
            # credentials): PostgreSQL is unavailable to us, whatever the reason.
            raise DatabaseUnavailable(str(exc)) from exc
        return connection

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._acquire()
                try:
                    rows: list[asyncpg.Record] = await conn.fetch(query, *args)
                finally:
                    await self._pool.release(conn)
                return rows
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable(str(exc)) from exc

    async def ping(self) -> bool:
        rows = await self._fetch(PING)
        return bool(rows)

    async def key_by_hash(self, key_hash: str, period_start: date) -> KeyRecord | None:
        rows = await self._fetch(SELECT_KEY_BY_HASH, key_hash, period_start)
        return KeyRecord.from_row(rows[0]) if rows else None

    async def token(self, cmc_id: int) -> TokenRow | None:
        rows = await self._fetch(SELECT_BY_CMC_ID, cmc_id)
        return _token_row(rows[0]) if rows else None

    async def ranking(
        self, sort: SortField, order: Order, limit: int, offset: int, as_of: datetime | None
    ) -> Ranking:
        statement, args = list_statement(sort, order, limit, offset, as_of)
        rows = await self._fetch(statement, *args)
        if rows:
            return Ranking([_summary(r) for r in rows], rows[0]["total"], rows[0]["snapshot"])
        if offset == 0:
            return Ranking([], 0, as_of)
        # Past the end: the total and snapshot still matter to the client.
        statement, args = list_statement(sort, order, 1, 0, as_of)
        rows = await self._fetch(statement, *args)
        if not rows:
            return Ranking([], 0, as_of)
        return Ranking([], rows[0]["total"], rows[0]["snapshot"])

    async def history(self, query: HistoryRange) -> list[HistoryPoint]:
        statement, args = history_statement(query)
        return [history_point(row) for row in await self._fetch(statement, *args)]

    @asynccontextmanager
    async def history_stream(
        self, query: HistoryRange
    ) -> AsyncIterator[AsyncIterable[asyncpg.Record]]:
        """The rows of ``query`` from a server-side cursor, for streaming without buffering.

        Only opening is bounded by the timeout: the stream then goes at the client's pace.
        """
        statement, args = history_statement(query)
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._acquire()
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable(str(exc)) from exc
        try:
            async with conn.transaction(readonly=True):
                yield conn.cursor(statement, *args, prefetch=500)
        finally:
            await self._pool.release(conn)

    async def by_symbol(self, symbol: str, limit: int) -> list[SymbolMatch]:
        rows = await self._fetch(SELECT_BY_SYMBOL, symbol, limit)
        return [
            SymbolMatch(
                cmc_id=r["cmc_id"],
                symbol=r["symbol"],
                name=r["name"],
                slug=r["slug"],
                cmc_rank=r["cmc_rank"],
                is_active=r["is_active"],
                ts=r["ts"],
                price_usd=to_number(r["price_usd"]),
                market_cap_usd=to_number(r["market_cap_usd"]),
                velocity=to_float(r["velocity"]),
            )
            for r in rows
        ]

    async def flush_usage(
        self, entries: Sequence[tuple[int, date, int, datetime]]
    ) -> list[tuple[int, date, int]]:
        """Add ``(key id, month, requests, last used)`` to the usage; returns the new totals."""
        rows = await self._fetch(
            FLUSH_USAGE,
            [e[0] for e in entries],
            [e[1] for e in entries],
            [e[2] for e in entries],
            [e[3] for e in entries],
        )
        return [(r["api_key_id"], r["period_start"], r["usage_count"]) for r in rows]
