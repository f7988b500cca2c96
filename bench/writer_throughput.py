"""Rows/s persisted by one writer vs a raw ``copy_records_to_table`` into the same table.

    .venv/bin/python bench/writer_throughput.py [--samples 100000] [--time-limit 300]

Both runs use the same real samples (TOKVEL_REPLAY_DATA, read in place) and the same
``token_metrics`` table of a database created for the run, on the local stack:

* raw: the rows, already converted to column values, in one ``copy_records_to_table`` straight
  into ``token_metrics`` (tokens and partitions created beforehand; only the COPY is timed) -
  the ceiling of what PostgreSQL takes on this machine. Run before and after the writer.
* writer: the same samples on ``token.metrics`` (produced beforehand, not timed), consumed by
  one writer with its default settings (in this process, Redis included). Timed from its first
  committed row to its last, read from its own ``tokvel_writer_rows_written_total``.

Everything the run creates (database, topics, Redis database 12) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.asyncio import Redis

# The recorded-data helpers are the tests' (bench and tests replay the same real samples).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.kafka import produce
from tests.support.recorded import metrics_sample, recorded_rows
from tests.support.writer import free_port
from tokvel_common.db.migrate import apply_migrations
from tokvel_common.events import MetricsSample
from tokvel_common.topics import METRICS, TOPICS, prefixed
from writer import app
from writer.repository import STAGING_COLUMNS, staging_record
from writer.settings import WriterSettings

BENCH_REDIS_DB = 12
START, END = "2017-08-10T00:00:00Z", "2017-08-18T00:00:00Z"  # the whole recorded week
# token_metrics columns in the order of the staging table, minus what tokens holds.
METRIC_COLUMNS = ("token_id", "timestamp", *STAGING_COLUMNS[5:])


def say(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


@asynccontextmanager
async def scratch_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"tokvel_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = _with_path(admin_dsn, f"/{name}")
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@asynccontextmanager
async def scratch_topics(bootstrap_servers: str) -> AsyncIterator[str]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(prefixed(prefix, t.name), t.partitions, 1, topic_configs=t.config)
                for t in TOPICS
            ]
        )
        yield prefix
        await admin.delete_topics([prefixed(prefix, t.name) for t in TOPICS])
    finally:
        await admin.close()


async def prepare_table(conn: asyncpg.Connection, samples: list[MetricsSample]) -> dict[int, int]:
    """Partitions for the samples' days and one tokens row per token; cmc id -> token id."""
    days = sorted({s.ts.date() for s in samples})
    await conn.execute(
        "SELECT tokvel_ensure_partitions($1::date, $2::integer)",
        days[0],
        (days[-1] - days[0]).days + 1,
    )
    await conn.executemany(
        "INSERT INTO tokens (cmc_id) VALUES ($1) ON CONFLICT DO NOTHING",
        [(i,) for i in sorted({s.cmc_id for s in samples})],
    )
    return {r["cmc_id"]: r["id"] for r in await conn.fetch("SELECT id, cmc_id FROM tokens")}


async def raw_copy(dsn: str, samples: list[MetricsSample]) -> float:
    """rows/s of one copy_records_to_table of prebuilt rows into token_metrics."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE token_metrics, token_latest")  # the same, empty table
        ids = await prepare_table(conn, samples)
        records = [
            (ids[s.cmc_id], s.ts, *staging_record(s)[5:]) for s in samples
        ]  # fmt: skip
        started = time.perf_counter()
        await conn.copy_records_to_table("token_metrics", records=records, columns=METRIC_COLUMNS)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return len(samples) / elapsed


async def _truncate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE token_metrics, token_latest")
    finally:
        await conn.close()


async def _metrics(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    """The writer's unlabelled samples (what this benchmark reads)."""
    try:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    except aiohttp.ClientError:
        return {}
    return {
        sample.name: float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def writer_run(settings: WriterSettings, total: int) -> tuple[float, float, float]:
    """(rows/s, seconds, seconds inside batch transactions) of one writer, from its first
    committed row to its last."""
    stop = asyncio.Event()
    task = asyncio.create_task(app.serve(settings, stop))
    first_at: float | None = None
    first_rows = 0.0
    try:
        async with aiohttp.ClientSession() as session:
            while True:
                scraped = await _metrics(session, settings.writer_ops_port)
                rows = scraped.get("tokvel_writer_rows_written_total", 0.0)
                now = time.perf_counter()
                if first_at is None and rows > 0:
                    first_at, first_rows = now, rows
                if rows >= total:
                    break
                if task.done():
                    task.result()
                    raise RuntimeError("the writer stopped before writing every row")
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    assert first_at is not None
    elapsed = now - first_at
    in_batches = scraped.get("tokvel_writer_batch_latency_seconds_sum", 0.0)
    return (total - first_rows) / elapsed, elapsed, in_batches


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds, overall")
    args = parser.parse_args(argv)

    base = WriterSettings()
    rows = recorded_rows(base.tokvel_replay_data, START, END)
    samples = [metrics_sample(row) for row in itertools.islice(rows, args.samples)]
    say(f"{len(samples)} real samples from {base.tokvel_replay_data.name}, "
        f"{samples[0].ts:%Y-%m-%d %H:%M} to {samples[-1].ts:%Y-%m-%d %H:%M}, "
        f"{len({s.cmc_id for s in samples})} tokens")  # fmt: skip
    redis_url = _with_path(base.redis_url.get_secret_value(), f"/{BENCH_REDIS_DB}")
    redis = Redis.from_url(redis_url)
    async with asyncio.timeout(args.time_limit):
        async with (
            scratch_database(base.database_url.get_secret_value()) as dsn,
            scratch_topics(base.kafka_bootstrap_servers) as prefix,
        ):
            raw_before = await raw_copy(dsn, samples)
            await _truncate(dsn)  # the writer starts from the same empty table
            say(f"raw copy_records_to_table:  {raw_before:>9,.0f} rows/s")

            topic = prefixed(prefix, METRICS)
            await produce(base.kafka_bootstrap_servers, topic, [(s.cmc_id, s) for s in samples])
            await redis.flushdb()
            overrides: dict[str, Any] = {
                "database_url": SecretStr(dsn),
                "redis_url": SecretStr(redis_url),
                "topic_prefix": prefix,
                "writer_ops_port": free_port(),
            }
            settings = WriterSettings.model_validate({**dict(base), **overrides})
            writer_rate, seconds, in_batches = await writer_run(settings, len(samples))
            say(f"one writer (Kafka -> PG):   {writer_rate:>9,.0f} rows/s ({seconds:.1f} s, "
                f"{in_batches:.1f} s of it writing batches of up to "
                f"{settings.writer_batch_max_rows})")  # fmt: skip

            raw_after = await raw_copy(dsn, samples)
            say(f"raw copy_records_to_table:  {raw_after:>9,.0f} rows/s (again, after)")
            raw = (raw_before + raw_after) / 2
            say(f"writer / raw: {writer_rate / raw:.0%}")
    await redis.flushdb()
    await redis.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
