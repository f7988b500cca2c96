"""Every SQL statement of the writer, and the transactions that run them.

A batch is one transaction: COPY into a per-connection TEMP staging table (emptied at commit),
then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` into ``token_metrics``, whose primary key
``(token_id, "timestamp")`` makes a redelivered sample a no-op. The same transaction creates the
``tokens`` row of a token seen for the first time, applies metadata from the info topic and
moves ``token_latest`` forward, so the cache can always be rebuilt from what is committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final

import asyncpg
import orjson

from tokvel_common.cache import TokenMetadata, TokenSnapshot
from tokvel_common.db.codecs import as_numeric
from tokvel_common.events import MetricsSample, TokenInfo

STAGING_TABLE: Final = "writer_staging"
STAGING_COLUMNS: Final = (
    "cmc_id",
    "ts",
    "symbol",
    "name",
    "slug",
    "cmc_rank",
    "price_usd",
    "market_cap_usd",
    "volume_24h_usd",
    "circulating_supply",
    "total_supply",
    "max_supply",
    "percent_change_1h",
    "percent_change_24h",
    "percent_change_7d",
    "velocity",
    "velocity_1h",
    "velocity_4h",
    "velocity_12h",
    "velocity_24h",
    "velocity_7d",
    "trend",
    "data_quality_score",
    "quality_flags",
    "details",
)

# Created once per connection and emptied by every commit: no catalog churn per batch.
CREATE_STAGING: Final = """
CREATE TEMP TABLE IF NOT EXISTS writer_staging (
    cmc_id              bigint NOT NULL,
    ts                  timestamptz NOT NULL,
    symbol              text,
    name                text,
    slug                text,
    cmc_rank            integer,
    price_usd           numeric,
    market_cap_usd      numeric,
    volume_24h_usd      numeric,
    circulating_supply  numeric,
    total_supply        numeric,
    max_supply          numeric,
    percent_change_1h   numeric,
    percent_change_24h  numeric,
    percent_change_7d   numeric,
    velocity            numeric,
    velocity_1h         double precision,
    velocity_4h         double precision,
    velocity_12h        double precision,
    velocity_24h        numeric,
    velocity_7d         double precision,
    trend               text,
    data_quality_score  numeric,
    quality_flags       text[],
    details             jsonb
) ON COMMIT DELETE ROWS
"""

# First sight of a token creates its row. The NOT EXISTS keeps known tokens from consuming an
# identity value per batch (ON CONFLICT alone would); ON CONFLICT covers a concurrent writer.
INSERT_NEW_TOKENS: Final = """
INSERT INTO tokens (cmc_id, symbol, name, slug, cmc_rank)
SELECT DISTINCT ON (s.cmc_id) s.cmc_id, s.symbol, s.name, s.slug, s.cmc_rank
FROM writer_staging s
WHERE NOT EXISTS (SELECT 1 FROM tokens t WHERE t.cmc_id = s.cmc_id)
ORDER BY s.cmc_id, s.ts DESC
ON CONFLICT (cmc_id) DO NOTHING
RETURNING cmc_id
"""

INSERT_METRICS: Final = """
INSERT INTO token_metrics (
    token_id, "timestamp", cmc_rank, price_usd, market_cap_usd, volume_24h_usd,
    circulating_supply, total_supply, max_supply, percent_change_1h, percent_change_24h,
    percent_change_7d, velocity, velocity_1h, velocity_4h, velocity_12h, velocity_24h,
    velocity_7d, trend, data_quality_score, quality_flags, details
)
SELECT
    t.id, s.ts, s.cmc_rank, s.price_usd, s.market_cap_usd, s.volume_24h_usd,
    s.circulating_supply, s.total_supply, s.max_supply, s.percent_change_1h,
    s.percent_change_24h, s.percent_change_7d, s.velocity, s.velocity_1h, s.velocity_4h,
    s.velocity_12h, s.velocity_24h, s.velocity_7d, s.trend, s.data_quality_score,
    s.quality_flags, s.details
FROM writer_staging s
JOIN tokens t ON t.cmc_id = s.cmc_id
ON CONFLICT (token_id, "timestamp") DO NOTHING
"""

# token_latest only moves forward in event time; the rank in tokens follows the latest sample
# (the trigger maintains updated_at). Rows are taken in token order so that two writers
# touching the same tokens during a rebalance lock them in the same order.
UPSERT_LATEST: Final = """
WITH latest AS (
    INSERT INTO token_latest AS l (token_id, "timestamp", cmc_rank, market_cap_usd, sample)
    SELECT t.id, u.ts, u.cmc_rank, u.market_cap_usd, u.sample
    FROM unnest($1::bigint[], $2::timestamptz[], $3::integer[], $4::numeric[], $5::jsonb[])
        AS u (cmc_id, ts, cmc_rank, market_cap_usd, sample)
    JOIN tokens t ON t.cmc_id = u.cmc_id
    ORDER BY t.id
    ON CONFLICT (token_id) DO UPDATE
    SET "timestamp" = EXCLUDED."timestamp",
        cmc_rank = EXCLUDED.cmc_rank,
        market_cap_usd = EXCLUDED.market_cap_usd,
        sample = EXCLUDED.sample
    WHERE l."timestamp" < EXCLUDED."timestamp"
    RETURNING l.token_id, l.cmc_rank
)
UPDATE tokens t SET cmc_rank = latest.cmc_rank
FROM latest
WHERE t.id = latest.token_id AND t.cmc_rank IS DISTINCT FROM latest.cmc_rank
"""

# Metadata from the info topic. An older message (redelivered) never overwrites newer metadata,
# and an unchanged one writes nothing, so updated_at moves only when something changed.
# Symbol, name and slug keep their value when the info lacks one.
UPSERT_METADATA: Final = """
INSERT INTO tokens AS t (
    cmc_id, symbol, name, slug, description, logo_url, website_url, twitter_url, reddit_url,
    github_url, whitepaper_url, date_added, info_fetched_at
)
SELECT * FROM unnest(
    $1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[], $13::timestamptz[]
)
ORDER BY 1
ON CONFLICT (cmc_id) DO UPDATE
SET symbol = COALESCE(EXCLUDED.symbol, t.symbol),
    name = COALESCE(EXCLUDED.name, t.name),
    slug = COALESCE(EXCLUDED.slug, t.slug),
    description = EXCLUDED.description,
    logo_url = EXCLUDED.logo_url,
    website_url = EXCLUDED.website_url,
    twitter_url = EXCLUDED.twitter_url,
    reddit_url = EXCLUDED.reddit_url,
    github_url = EXCLUDED.github_url,
    whitepaper_url = EXCLUDED.whitepaper_url,
    date_added = EXCLUDED.date_added,
    info_fetched_at = EXCLUDED.info_fetched_at
WHERE (t.info_fetched_at IS NULL OR t.info_fetched_at < EXCLUDED.info_fetched_at)
  AND (t.symbol, t.name, t.slug, t.description, t.logo_url, t.website_url, t.twitter_url,
       t.reddit_url, t.github_url, t.whitepaper_url, t.date_added)
      IS DISTINCT FROM
      (COALESCE(EXCLUDED.symbol, t.symbol), COALESCE(EXCLUDED.name, t.name),
       COALESCE(EXCLUDED.slug, t.slug), EXCLUDED.description, EXCLUDED.logo_url,
       EXCLUDED.website_url, EXCLUDED.twitter_url, EXCLUDED.reddit_url, EXCLUDED.github_url,
       EXCLUDED.whitepaper_url, EXCLUDED.date_added)
RETURNING t.cmc_id, (t.xmax = 0) AS inserted
"""

SELECT_SNAPSHOTS: Final = """
SELECT
    t.cmc_id, t.symbol, t.name, t.slug, t.cmc_rank, t.description, t.logo_url, t.website_url,
    t.twitter_url, t.reddit_url, t.github_url, t.whitepaper_url, t.date_added, t.is_active,
    t.updated_at, l.sample
FROM tokens t JOIN token_latest l ON l.token_id = t.id
WHERE t.cmc_id = ANY($1::bigint[])
"""
SELECT_TOP_SNAPSHOTS: Final = """
SELECT
    t.cmc_id, t.symbol, t.name, t.slug, t.cmc_rank, t.description, t.logo_url, t.website_url,
    t.twitter_url, t.reddit_url, t.github_url, t.whitepaper_url, t.date_added, t.is_active,
    t.updated_at, l.sample
FROM token_latest l JOIN tokens t ON t.id = l.token_id
ORDER BY l.market_cap_usd DESC NULLS LAST, t.cmc_id
LIMIT $1
"""

# Each partition's index on "timestamp" answers this without a scan.
SELECT_NEWEST_EVENT_TIME: Final = 'SELECT max("timestamp") FROM token_metrics'
COUNT_MISSING_PARTITIONS: Final = """
SELECT count(*)
FROM generate_series($1::date, $1::date + ($2::integer - 1), interval '1 day') AS d (day)
WHERE to_regclass('public.' || tokvel_partition_name(d.day::date)) IS NULL
"""
# Creating a partition locks token_metrics (ACCESS EXCLUSIVE) and then, to clone the foreign
# key, tokens (SHARE ROW EXCLUSIVE). Batches lock tokens first and token_metrics second, so a
# creator must take tokens first too, or a batch and a creator each wait for the other.
LOCK_TOKENS_FOR_PARTITIONING: Final = "LOCK TABLE tokens IN SHARE ROW EXCLUSIVE MODE"
ENSURE_PARTITIONS: Final = "SELECT tokvel_ensure_partitions($1::date, $2::integer)"
DROP_PARTITIONS_BEFORE: Final = "SELECT tokvel_drop_partitions_before($1::date) AS name"
# A drop queues behind running writes and every later write queues behind it: bound the wait.
SET_LOCAL_LOCK_TIMEOUT: Final = "SELECT set_config('lock_timeout', $1, true)"
PING: Final = "SELECT 1"


@dataclass(frozen=True)
class WriteResult:
    rows_staged: int
    rows_inserted: int
    tokens_created: list[int]  # cmc ids
    metadata_changed: list[int]  # cmc ids whose row the info messages changed

    @property
    def conflicts_skipped(self) -> int:
        return self.rows_staged - self.rows_inserted


def _details(sample: MetricsSample) -> str:
    """The sample's fields that have no column of their own."""
    return orjson.dumps(
        {
            "coverage": {k: v.model_dump() for k, v in sample.coverage.items()},
            "trend_recent_avg": sample.trend_recent_avg,
            "polled_at": sample.polled_at,
            "schema_version": sample.schema_version,
        }
    ).decode()


def staging_record(sample: MetricsSample) -> tuple[Any, ...]:
    """One row of the staging table, in :data:`STAGING_COLUMNS` order, numbers exact."""
    return (
        sample.cmc_id,
        sample.ts,
        sample.symbol,
        sample.name,
        sample.slug,
        sample.cmc_rank,
        as_numeric(sample.price_usd),
        as_numeric(sample.market_cap_usd),
        as_numeric(sample.volume_24h_usd),
        as_numeric(sample.circulating_supply),
        as_numeric(sample.total_supply),
        as_numeric(sample.max_supply),
        as_numeric(sample.percent_change_1h),
        as_numeric(sample.percent_change_24h),
        as_numeric(sample.percent_change_7d),
        as_numeric(sample.velocity),
        sample.velocity_1h,
        sample.velocity_4h,
        sample.velocity_12h,
        as_numeric(sample.velocity_24h),
        sample.velocity_7d,
        sample.trend,
        as_numeric(sample.data_quality_score),
        sample.quality_flags,
        _details(sample),
    )


def newest_per_token(samples: Iterable[MetricsSample]) -> list[MetricsSample]:
    """The newest sample (event time) of each token, in cmc id order."""
    newest: dict[int, MetricsSample] = {}
    for sample in samples:
        current = newest.get(sample.cmc_id)
        if current is None or sample.ts >= current.ts:
            newest[sample.cmc_id] = sample
    return [newest[k] for k in sorted(newest)]


def newest_info_per_token(infos: Iterable[TokenInfo]) -> list[TokenInfo]:
    """One info per token (the latest fetched): an upsert may touch a row only once."""
    newest: dict[int, TokenInfo] = {}
    for info in infos:
        current = newest.get(info.cmc_id)
        if current is None or info.fetched_at >= current.fetched_at:
            newest[info.cmc_id] = info
    return [newest[k] for k in sorted(newest)]


def _latest_arguments(samples: Sequence[MetricsSample]) -> tuple[list[Any], ...]:
    return (
        [s.cmc_id for s in samples],
        [s.ts for s in samples],
        [s.cmc_rank for s in samples],
        [as_numeric(s.market_cap_usd) for s in samples],
        [orjson.dumps(s.model_dump(mode="python")).decode() for s in samples],
    )


def _info_arguments(infos: Sequence[TokenInfo]) -> tuple[list[Any], ...]:
    fields = (
        "cmc_id",
        "symbol",
        "name",
        "slug",
        "description",
        "logo_url",
        "website_url",
        "twitter_url",
        "reddit_url",
        "github_url",
        "whitepaper_url",
        "date_added",
        "fetched_at",
    )
    return tuple([getattr(info, f) for info in infos] for f in fields)


@dataclass(frozen=True)
class BatchRows:
    """A batch as the parameters of its transaction, built without I/O (see batch_rows)."""

    staging: list[tuple[Any, ...]]
    latest: tuple[list[Any], ...]
    infos: tuple[list[Any], ...] | None


def batch_rows(samples: Sequence[MetricsSample], infos: Sequence[TokenInfo]) -> BatchRows:
    """All the CPU work of a batch, so that it can run while the previous batch is in
    PostgreSQL."""
    return BatchRows(
        staging=[staging_record(s) for s in samples],
        latest=_latest_arguments(newest_per_token(samples)),
        infos=_info_arguments(newest_info_per_token(infos)) if infos else None,
    )


def _milliseconds(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms"


def _inserted_rows(status: str) -> int:
    """The row count of an ``INSERT 0 <n>`` command status."""
    return int(status.rsplit(" ", 1)[-1])


def _snapshot(row: asyncpg.Record) -> TokenSnapshot:
    token = TokenMetadata.model_validate({k: v for k, v in row.items() if k != "sample"})
    return TokenSnapshot(token=token, metrics=MetricsSample.model_validate_json(row["sample"]))


class WriterRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def ping(self) -> bool:
        async with self._pool.acquire() as conn:
            return bool(await conn.fetchval(PING))

    async def ensure_partitions(
        self, first_day: date, days: int, lock_timeout_seconds: float | None = None
    ) -> int:
        """Daily partitions for ``[first_day, first_day + days)``; returns how many were new.

        Takes no lock at all when they exist already (the common case).
        """
        async with self._pool.acquire() as conn:
            if not await conn.fetchval(COUNT_MISSING_PARTITIONS, first_day, days):
                return 0
            async with conn.transaction():
                if lock_timeout_seconds is not None:
                    await conn.execute(SET_LOCAL_LOCK_TIMEOUT, _milliseconds(lock_timeout_seconds))
                await conn.execute(LOCK_TOKENS_FOR_PARTITIONING)
                created: int = await conn.fetchval(ENSURE_PARTITIONS, first_day, days)
        return created

    async def write_batch(self, rows: BatchRows) -> WriteResult:
        """One transaction: metadata, then samples (COPY + INSERT ... SELECT), then latest."""
        tokens_created: list[int] = []
        metadata_changed: list[int] = []
        inserted = 0
        async with self._pool.acquire() as conn, conn.transaction():
            if rows.infos is not None:
                for row in await conn.fetch(UPSERT_METADATA, *rows.infos):
                    (tokens_created if row["inserted"] else metadata_changed).append(row["cmc_id"])
            if rows.staging:
                await conn.execute(CREATE_STAGING)
                await conn.copy_records_to_table(
                    STAGING_TABLE, records=rows.staging, columns=STAGING_COLUMNS
                )
                tokens_created.extend(r["cmc_id"] for r in await conn.fetch(INSERT_NEW_TOKENS))
                inserted = _inserted_rows(await conn.execute(INSERT_METRICS))
                await conn.execute(UPSERT_LATEST, *rows.latest)
        return WriteResult(len(rows.staging), inserted, tokens_created, metadata_changed)

    async def snapshots(self, cmc_ids: Iterable[int]) -> list[TokenSnapshot]:
        """The cached state of these tokens (those with at least one sample)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SELECT_SNAPSHOTS, list(cmc_ids))
        return [_snapshot(row) for row in rows]

    async def top_snapshots(self, limit: int) -> list[TokenSnapshot]:
        """The ``limit`` tokens of largest market cap (latest sample), largest first."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(SELECT_TOP_SNAPSHOTS, limit)
        return [_snapshot(row) for row in rows]

    async def newest_event_time(self) -> datetime | None:
        async with self._pool.acquire() as conn:
            newest: datetime | None = await conn.fetchval(SELECT_NEWEST_EVENT_TIME)
        return newest

    async def drop_partitions_before(self, cutoff: date, lock_timeout_seconds: float) -> list[str]:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(SET_LOCAL_LOCK_TIMEOUT, _milliseconds(lock_timeout_seconds))
            rows = await conn.fetch(DROP_PARTITIONS_BEFORE, cutoff)
        return [row["name"] for row in rows]
