"""The writer's SQL against a real PostgreSQL: idempotence, first sight, metadata, exactness."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import orjson
import pytest

from tokvel_common.db.pool import create_pool
from tokvel_common.events import MetricsSample, TokenInfo
from writer.repository import WriterRepository, batch_rows

pytestmark = pytest.mark.integration

FETCHED = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
async def repository(database_url: str) -> AsyncIterator[WriterRepository]:
    pool = await create_pool(database_url, max_size=2)
    try:
        yield WriterRepository(pool)
    finally:
        await pool.close()


async def _prepare(repository: WriterRepository, samples: list[MetricsSample]) -> None:
    days = sorted({s.ts.date() for s in samples})
    await repository.ensure_partitions(days[0], (days[-1] - days[0]).days + 1)


async def test_a_batch_written_twice_stores_each_sample_once(
    repository: WriterRepository, db: asyncpg.Connection, replay_slice: list[MetricsSample]
) -> None:
    batch = replay_slice[:1000]
    await _prepare(repository, batch)
    first = await repository.write_batch(batch_rows(batch, []))
    again = await repository.write_batch(batch_rows([*batch[500:], *batch[:10]], []))

    tokens = len({s.cmc_id for s in batch})
    assert (first.rows_inserted, first.conflicts_skipped) == (1000, 0)
    assert len(first.tokens_created) == tokens
    assert (again.rows_inserted, again.conflicts_skipped, again.tokens_created) == (0, 510, [])
    assert await db.fetchval("SELECT count(*) FROM token_metrics") == 1000
    assert await db.fetchval("SELECT count(*) FROM tokens") == tokens
    # No identity value is burnt by known tokens: ids are 1..n.
    assert await db.fetchval("SELECT max(id) FROM tokens") == tokens


async def test_a_redelivery_mixed_with_new_samples_stores_only_the_new_ones(
    repository: WriterRepository, db: asyncpg.Connection, replay_slice: list[MetricsSample]
) -> None:
    stored, new = replay_slice[:300], replay_slice[300:600]
    await _prepare(repository, replay_slice[:600])
    await repository.write_batch(batch_rows(stored, []))
    # Stored samples, new ones, and one new sample twice in the same batch.
    mixed = await repository.write_batch(batch_rows([*new, *stored[::3], new[0]], []))

    assert (mixed.rows_inserted, mixed.conflicts_skipped) == (300, 101)
    assert await db.fetchval("SELECT count(*) FROM token_metrics") == 600


async def test_text_values_reach_postgresql_unchanged(
    repository: WriterRepository, db: asyncpg.Connection, replay_slice: list[MetricsSample]
) -> None:
    # Every character with a meaning in COPY text or in an array literal.
    flags = ['quo"te', "back\\slash", "tab\there", "new\nline", "cr\rhere", "NULL", "", "{,}"]
    sample = replay_slice[0].model_copy(update={"quality_flags": flags})
    await _prepare(repository, [sample])
    await repository.write_batch(batch_rows([sample], []))
    row = await db.fetchrow("SELECT quality_flags, trend, details FROM token_metrics")
    assert row is not None
    assert row["quality_flags"] == flags
    assert row["trend"] == sample.trend
    assert orjson.loads(row["details"])["schema_version"] == sample.schema_version


async def test_a_token_row_gone_is_looked_up_again_on_the_retry(
    repository: WriterRepository, db: asyncpg.Connection, replay_slice: list[MetricsSample]
) -> None:
    btc = [s for s in replay_slice if s.cmc_id == 1][:2]
    await _prepare(repository, btc)
    await repository.write_batch(batch_rows(btc[:1], []))
    # Say a backup without this token was restored: the id the repository knows is gone.
    await db.execute(
        "DELETE FROM token_metrics; DELETE FROM token_latest; DELETE FROM tokens WHERE cmc_id = 1"
    )

    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await repository.write_batch(batch_rows(btc[1:], []))
    retried = await repository.write_batch(batch_rows(btc[1:], []))
    assert (retried.rows_inserted, retried.tokens_created) == (1, [1])


async def test_numbers_reach_postgresql_exactly(
    repository: WriterRepository, db: asyncpg.Connection, replay_slice: list[MetricsSample]
) -> None:
    # Today's extremes (ARCHITECTURE.md): supplies above 10^14, prices below 10^-9, percent
    # changes above 10^6 %, a market cap of 0; plus a computed double in a double column.
    extreme = replay_slice[0].model_copy(
        update={
            "cmc_id": 5994,
            "circulating_supply": 589_246_388_908_467,
            "total_supply": 999_982_362_272_990,
            "price_usd": 8.53e-10,
            "percent_change_24h": 1_234_567.891,
            "market_cap_usd": 0,
            "velocity_1h": 0.1 + 0.2,
        }
    )
    await _prepare(repository, [extreme])
    await repository.write_batch(batch_rows([extreme], []))
    row = await db.fetchrow(
        """SELECT m.* FROM token_metrics m JOIN tokens t ON t.id = m.token_id
           WHERE t.cmc_id = 5994"""
    )
    assert row is not None
    assert row["circulating_supply"] == Decimal(589_246_388_908_467)
    assert row["total_supply"] == Decimal(999_982_362_272_990)
    assert row["price_usd"] == Decimal("8.53E-10")
    assert row["percent_change_24h"] == Decimal("1234567.891")
    assert row["market_cap_usd"] == Decimal(0)
    assert row["velocity_1h"] == 0.1 + 0.2
    assert row["velocity"] == Decimal(repr(extreme.velocity))


async def test_token_latest_only_moves_forward_and_carries_the_rank(
    repository: WriterRepository, db: asyncpg.Connection, replay_slice: list[MetricsSample]
) -> None:
    btc = [s for s in replay_slice if s.cmc_id == 1][:3]
    newest = btc[-1].model_copy(update={"cmc_rank": 7})
    await _prepare(repository, btc)
    await repository.write_batch(batch_rows([btc[0], newest], []))
    await repository.write_batch(batch_rows([btc[1]], []))  # older, arrives late
    [snapshot] = await repository.snapshots([1])
    assert snapshot.metrics == newest
    assert snapshot.token.cmc_rank == 7
    assert await db.fetchval("SELECT cmc_rank FROM tokens WHERE cmc_id = 1") == 7


async def test_metadata_lands_in_tokens_and_updated_at_moves_only_on_change(
    repository: WriterRepository, db: asyncpg.Connection
) -> None:
    info = TokenInfo(
        cmc_id=1, symbol="BTC", name="Bitcoin", description="first", fetched_at=FETCHED
    )
    created = await repository.write_batch(batch_rows([], [info]))
    assert (created.tokens_created, created.metadata_changed) == ([1], [])
    before = await db.fetchrow("SELECT * FROM tokens WHERE cmc_id = 1")

    same = info.model_copy(update={"fetched_at": FETCHED + timedelta(days=1)})
    assert (await repository.write_batch(batch_rows([], [same]))).metadata_changed == []
    unchanged = await db.fetchrow("SELECT * FROM tokens WHERE cmc_id = 1")
    assert unchanged is not None and before is not None
    assert unchanged["updated_at"] == before["updated_at"]

    newer = info.model_copy(
        update={"description": "second", "name": None, "fetched_at": FETCHED + timedelta(days=2)}
    )
    older = info.model_copy(update={"description": "stale", "fetched_at": FETCHED})
    assert (await repository.write_batch(batch_rows([], [newer, older]))).metadata_changed == [1]
    assert (
        await repository.write_batch(batch_rows([], [older]))
    ).metadata_changed == []  # redelivered
    after = await db.fetchrow("SELECT * FROM tokens WHERE cmc_id = 1")
    assert after is not None
    assert (after["description"], after["name"]) == ("second", "Bitcoin")  # name kept
    assert after["updated_at"] > before["updated_at"]


async def test_top_snapshots_are_the_largest_market_caps(
    repository: WriterRepository, replay_slice: list[MetricsSample]
) -> None:
    first_snapshot = [s for s in replay_slice if s.ts == replay_slice[0].ts]
    await _prepare(repository, first_snapshot)
    await repository.write_batch(batch_rows(first_snapshot, []))
    top = await repository.top_snapshots(100)
    expected = sorted(first_snapshot, key=lambda s: (-(s.market_cap_usd or -1), s.cmc_id))[:100]
    assert [s.token.cmc_id for s in top] == [s.cmc_id for s in expected]


async def test_partitions_and_retention_functions(
    repository: WriterRepository, db: asyncpg.Connection
) -> None:
    assert await repository.ensure_partitions(date(2017, 8, 10), 3) == 3
    assert await repository.ensure_partitions(date(2017, 8, 11), 3) == 1
    assert await repository.drop_partitions_before(date(2017, 8, 12), 2.0) == [
        "token_metrics_p20170810",
        "token_metrics_p20170811",
    ]
    assert await repository.newest_event_time() is None
