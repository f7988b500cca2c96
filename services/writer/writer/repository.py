"""Every SQL statement of the writer, and the transactions that run them.

A batch is one transaction. Its samples are ``COPY``'d straight into ``token_metrics``, whose
primary key ``(token_id, "timestamp")`` refuses a sample stored already; only then (a
redelivery or a replay) the transaction is done again the slow way: ``COPY`` into a
per-connection TEMP staging table, then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``. A
redelivered sample is a no-op either way. The same transaction creates the ``tokens`` row of a
token seen for the first time, applies metadata from the info topic and moves ``token_latest``
forward, so the cache can always be rebuilt from what is committed.

Rows travel as COPY *text*: a number is written as the decimal text it is exactly (an ``int``
in full, a double as its shortest round-trip decimal, the value of the text
:func:`tokvel_common.db.codecs.as_numeric` builds its ``Decimal`` from) and PostgreSQL parses
it. A ``Decimal`` per numeric value for asyncpg's binary encoder cost the writer's process about
as much CPU as PostgreSQL spends storing the row (``bench/writer_throughput.py``).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final

import asyncpg
import orjson

from tokvel_common.cache import TokenMetadata, TokenSnapshot
from tokvel_common.db.codecs import as_numeric
from tokvel_common.events import MetricsSample, TokenInfo

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# The token_metrics columns the writer fills, in the order of a COPY line.
METRIC_COLUMNS: Final = (
    "token_id",
    "timestamp",
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
    "data_quality_score",
    "trend",
    "quality_flags",
    "details",
)
METRICS_TABLE: Final = "token_metrics"
STAGING_TABLE: Final = "writer_staging"

# Created once per connection (on the first redelivery) and emptied by every commit.
CREATE_STAGING: Final = """
CREATE TEMP TABLE IF NOT EXISTS writer_staging (LIKE token_metrics INCLUDING DEFAULTS)
ON COMMIT DELETE ROWS
"""
INSERT_STAGED_METRICS: Final = """
INSERT INTO token_metrics (
    token_id, "timestamp", cmc_rank, price_usd, market_cap_usd, volume_24h_usd,
    circulating_supply, total_supply, max_supply, percent_change_1h, percent_change_24h,
    percent_change_7d, velocity, velocity_1h, velocity_4h, velocity_12h, velocity_24h,
    velocity_7d, trend, data_quality_score, quality_flags, details
)
SELECT
    token_id, "timestamp", cmc_rank, price_usd, market_cap_usd, volume_24h_usd,
    circulating_supply, total_supply, max_supply, percent_change_1h, percent_change_24h,
    percent_change_7d, velocity, velocity_1h, velocity_4h, velocity_12h, velocity_24h,
    velocity_7d, trend, data_quality_score, quality_flags, details
FROM writer_staging
ON CONFLICT (token_id, "timestamp") DO NOTHING
"""

# First sight of a token creates its row, from its newest sample of the batch. The NOT EXISTS
# keeps known tokens from consuming an identity value (ON CONFLICT alone would); ON CONFLICT
# covers a concurrent writer.
INSERT_NEW_TOKENS: Final = """
INSERT INTO tokens (cmc_id, symbol, name, slug, cmc_rank)
SELECT u.cmc_id, u.symbol, u.name, u.slug, u.cmc_rank
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::integer[])
    AS u (cmc_id, symbol, name, slug, cmc_rank)
WHERE NOT EXISTS (SELECT 1 FROM tokens t WHERE t.cmc_id = u.cmc_id)
ORDER BY u.cmc_id
ON CONFLICT (cmc_id) DO NOTHING
RETURNING cmc_id
"""
SELECT_IDS_BY_CMC_ID: Final = "SELECT cmc_id, id FROM tokens WHERE cmc_id = ANY($1::bigint[])"

# token_latest only moves forward in event time; the rank in tokens follows the latest sample
# (the trigger maintains updated_at). Rows are taken in token order so that two writers
# touching the same tokens during a rebalance lock them in the same order.
UPSERT_LATEST: Final = """
WITH latest AS (
    INSERT INTO token_latest AS l (token_id, "timestamp", cmc_rank, market_cap_usd, sample)
    SELECT u.token_id, u.ts, u.cmc_rank, u.market_cap_usd, u.sample
    FROM unnest($1::bigint[], $2::timestamptz[], $3::integer[], $4::numeric[], $5::jsonb[])
        AS u (token_id, ts, cmc_rank, market_cap_usd, sample)
    ORDER BY u.token_id
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


def details_json(sample: MetricsSample) -> str:
    """The sample's fields that have no column of their own."""
    return orjson.dumps(
        {
            "coverage": {k: v.model_dump() for k, v in sample.coverage.items()},
            "trend_recent_avg": sample.trend_recent_avg,
            "polled_at": sample.polled_at,
            "schema_version": sample.schema_version,
        }
    ).decode()


_NULL: Final = "\\N"


def _copy_text(text: str) -> str:
    """A value as a COPY text field: backslashes doubled, field and line ends escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# The samples of one poll share their timestamp, and a handful of distinct flag lists recur in
# every batch: each is formatted once.
@functools.lru_cache(maxsize=1024)
def _timestamp_text(ts: datetime) -> str:
    return ts.isoformat()


@functools.lru_cache(maxsize=256)
def _text_array(items: tuple[str, ...]) -> str:
    """A ``text[]`` literal as a COPY field; every element quoted, so none reads as NULL."""
    quoted = ('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items)
    return _copy_text("{" + ",".join(quoted) + "}")


def _numbers_text(numbers: tuple[int | float | None, ...]) -> str:
    """Numbers as tab-separated COPY fields, each the decimal text it is exactly.

    orjson writes a double as its shortest round-trip decimal, the value ``repr`` writes (the
    exponent may be spelled differently), and an int in full; one call for all of them costs
    half what ``repr`` per number does.
    """
    try:
        text = orjson.dumps(numbers).decode()
    except TypeError:  # an int beyond 64 bits, which orjson refuses
        return "\t".join(_NULL if n is None else repr(n) for n in numbers)
    return text[1:-1].replace(",", "\t").replace("null", _NULL)


def copy_line(sample: MetricsSample) -> str:
    """The sample's ``token_metrics`` row as COPY text, every column of :data:`METRIC_COLUMNS`
    but the first (the token id, which may not exist before the batch's transaction).

    Numbers are exact (``_numbers_text``). Non-finite doubles never get here: decode_batch
    dead-letters them.
    """
    numbers = (
        sample.cmc_rank,
        sample.price_usd,
        sample.market_cap_usd,
        sample.volume_24h_usd,
        sample.circulating_supply,
        sample.total_supply,
        sample.max_supply,
        sample.percent_change_1h,
        sample.percent_change_24h,
        sample.percent_change_7d,
        sample.velocity,
        sample.velocity_1h,
        sample.velocity_4h,
        sample.velocity_12h,
        sample.velocity_24h,
        sample.velocity_7d,
        sample.data_quality_score,
    )
    return "\t".join(
        (
            _timestamp_text(sample.ts),
            _numbers_text(numbers),
            sample.trend,  # one of four literals, none with a character to escape
            _text_array(tuple(sample.quality_flags)),
            _copy_text(details_json(sample)),
        )
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
    """UPSERT_LATEST's parameters after the first (the token ids)."""
    return (
        [s.ts for s in samples],
        [s.cmc_rank for s in samples],
        [as_numeric(s.market_cap_usd) for s in samples],
        [orjson.dumps(s.model_dump(mode="python")).decode() for s in samples],
    )


def _token_arguments(samples: Sequence[MetricsSample]) -> tuple[list[Any], ...]:
    """INSERT_NEW_TOKENS' parameters (the first: the cmc ids)."""
    return (
        [s.cmc_id for s in samples],
        [s.symbol for s in samples],
        [s.name for s in samples],
        [s.slug for s in samples],
        [s.cmc_rank for s in samples],
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
    """A batch as the parameters of its transaction, built without I/O (see batch_rows); plain
    lists and strings, cheap to hand from a worker process to the writer's."""

    cmc_ids: list[int]  # of each sample, in the order of lines
    lines: list[str]  # each sample's row as COPY text after its token id (copy_line)
    # One entry per token of the batch, in cmc id order, from its newest sample:
    tokens: tuple[list[Any], ...]  # INSERT_NEW_TOKENS' parameters (the first: the cmc ids)
    latest: tuple[list[Any], ...]  # UPSERT_LATEST's parameters after the token ids
    infos: tuple[list[Any], ...] | None

    @property
    def token_cmc_ids(self) -> list[int]:
        cmc_ids: list[int] = self.tokens[0]
        return cmc_ids


def batch_rows(samples: Sequence[MetricsSample], infos: Sequence[TokenInfo]) -> BatchRows:
    """All the CPU work of a batch, so that it can run while the previous batch is in
    PostgreSQL."""
    newest = newest_per_token(samples)
    return BatchRows(
        cmc_ids=[s.cmc_id for s in samples],
        lines=[copy_line(s) for s in samples],
        tokens=_token_arguments(newest),
        latest=_latest_arguments(newest),
        infos=_info_arguments(newest_info_per_token(infos)) if infos else None,
    )


def _copy_data(token_ids: Iterable[int], lines: Iterable[str]) -> bytes:
    return "".join(
        f"{token_id}\t{line}\n" for token_id, line in zip(token_ids, lines, strict=True)
    ).encode()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    """COPY input for asyncpg (which would take plain bytes for a file name)."""
    yield data


async def _copy_text_rows(conn: Connection, table: str, data: bytes) -> str:
    status: str = await conn.copy_to_table(
        table, source=_chunks(data), columns=METRIC_COLUMNS, format="text"
    )
    return status


async def _insert_metrics(conn: Connection, data: bytes, *, direct: bool) -> int:
    """The rows into token_metrics; returns how many were new.

    ``direct``: one COPY straight into the table, which the primary key makes all or nothing.
    Otherwise COPY into the staging table, then INSERT ... ON CONFLICT DO NOTHING.
    """
    if direct:
        return _row_count(await _copy_text_rows(conn, METRICS_TABLE, data))
    await conn.execute(CREATE_STAGING)
    await _copy_text_rows(conn, STAGING_TABLE, data)
    return _row_count(await conn.execute(INSERT_STAGED_METRICS))


def _milliseconds(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms"


def _row_count(status: str) -> int:
    """The row count of an ``INSERT 0 <n>`` or ``COPY <n>`` command status."""
    return int(status.rsplit(" ", 1)[-1])


def _snapshot(row: asyncpg.Record) -> TokenSnapshot:
    token = TokenMetadata.model_validate({k: v for k, v in row.items() if k != "sample"})
    return TokenSnapshot(token=token, metrics=MetricsSample.model_validate_json(row["sample"]))


class WriterRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # tokens.id by cmc id, of rows known to be committed: a batch of known tokens reads
        # nothing before its COPY. Ids never change; a row gone (a restored backup) makes the
        # COPY fail on the foreign key, which empties this and the retry looks them up again.
        self._token_ids: dict[int, int] = {}

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
        """One transaction: metadata, new tokens, token_latest, then the samples."""
        try:
            return await self._write_batch(rows, direct=True)
        except asyncpg.UniqueViolationError:
            # Some samples are stored already (a redelivery, a replay): the COPY refused the
            # batch and the transaction is undone. Again, skipping those.
            return await self._write_batch(rows, direct=False)

    async def _write_batch(self, rows: BatchRows, *, direct: bool) -> WriteResult:
        # token_latest goes before token_metrics: its UPDATE of tokens locks tokens first, the
        # order partition creation relies on (see LOCK_TOKENS_FOR_PARTITIONING).
        tokens_created: list[int] = []
        metadata_changed: list[int] = []
        inserted = 0
        found: dict[int, int] = {}
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    if rows.infos is not None:
                        for row in await conn.fetch(UPSERT_METADATA, *rows.infos):
                            changed = tokens_created if row["inserted"] else metadata_changed
                            changed.append(row["cmc_id"])
                    if rows.lines:
                        found = await self._create_tokens(conn, rows.tokens, tokens_created)
                        ids = {**self._token_ids, **found} if found else self._token_ids
                        token_ids = [ids[c] for c in rows.token_cmc_ids]
                        await conn.execute(UPSERT_LATEST, token_ids, *rows.latest)
                        data = _copy_data((ids[c] for c in rows.cmc_ids), rows.lines)
                        inserted = await _insert_metrics(conn, data, direct=direct)
            except asyncpg.ForeignKeyViolationError:
                self._token_ids.clear()
                raise
        self._token_ids.update(found)
        return WriteResult(len(rows.lines), inserted, tokens_created, metadata_changed)

    async def _create_tokens(
        self, conn: Connection, tokens: tuple[list[Any], ...], created: list[int]
    ) -> dict[int, int]:
        """The ids of the batch's tokens this repository does not know yet, by cmc id; the rows
        of those seen for the first time are created (their cmc ids appended to ``created``)."""
        unknown = [i for i, cmc_id in enumerate(tokens[0]) if cmc_id not in self._token_ids]
        if not unknown:
            return {}
        arguments = tuple([column[i] for i in unknown] for column in tokens)
        created.extend(r["cmc_id"] for r in await conn.fetch(INSERT_NEW_TOKENS, *arguments))
        rows = await conn.fetch(SELECT_IDS_BY_CMC_ID, arguments[0])
        return {r["cmc_id"]: r["id"] for r in rows}

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
