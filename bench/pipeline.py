"""Wall time of the whole pipeline on the recorded week, raw quotes to PostgreSQL, against a
plain aiokafka consumer feeding the writer's own code, no Faust.

    .venv/bin/python bench/pipeline.py [--samples 391279] [--workers 1] [--json PATH]

On the local stack (Kafka, PostgreSQL, Redis on loopback), everything on this machine:

1. the first ``--samples`` quotes of the recorded 5-minute week (TOKVEL_REPLAY_DATA; all
   391 279 by default) are published by ``tokvel backfill`` into ``cmc.quotes.raw`` under a
   fresh topic prefix, exactly as a backfill would (not timed);
2. **baseline**, in this process: one aiokafka consumer (the project's consumer factory) reads
   that topic from the start; each quote goes through the velocity rules as plain function
   calls (``velocity.rules.validate`` and ``apply`` on a dict of ``TokenWindows``), and the
   samples of each poll are written with the writer's own code (``batch_rows``,
   ``PartitionDays``, ``WriterRepository.write_batch``: COPY, INSERT ... ON CONFLICT,
   ``token_latest``), one write in flight while the next poll is decoded, offsets committed
   after each write. No Faust, no second topic, no Redis. Timed from the consumer's creation
   until the last row is committed; the rows it inserted are the target of (3);
3. **tokvel**: ``--workers`` velocity workers and one writer, each ``tokvel run ...`` as its
   own process with its default settings, on a second fresh database. Timed from the moment
   the processes are started (their start-up, group joins and Faust's recovery count) until
   the writer's ``tokvel_writer_rows_written_total`` reaches the baseline's row count; then
   ``token_metrics`` is counted and compared with the baseline's (count and a digest of every
   row's key and computed columns), so both did the same work.

Target: tokvel's wall time at most 4x the baseline's. Both databases, the topics and the Redis
database (``--redis-db``, flushed before and after) are removed at the end; every step is
bounded by ``--time-limit``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    cpu_seconds,
    say,
    scrape,
    scratch_database,
    scratch_topics,
    show_logs,
    start_service,
    stop_process,
    with_path,
)
from bench.report import Figure, write_figures
from tokvel_common.db.pool import create_pool
from tokvel_common.events import MetricsSample
from tokvel_common.kafka import create_consumer
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import RAW_QUOTES, TOPICS, prefixed
from tokvel_common.velocity_math import TokenWindows
from velocity.rules import Rejection, apply, validate
from velocity.settings import VelocitySettings
from writer.maintenance import PartitionDays, event_day
from writer.metrics import WriterMetrics
from writer.repository import WriteResult, WriterRepository, batch_rows
from writer.settings import WriterSettings

RECORDED_WEEK_SAMPLES = 391_279
RECORDING_INTERVAL_SECONDS = 300  # the recording's cadence: each window's points_expected
TARGET_RATIO = 4.0
PROGRESS_SECONDS = 15.0
POLL_SECONDS = 0.25
PUBLISH_BATCH = 20_000  # quotes per backfill checkpoint: fewer waits for acknowledgements
ROWS_WRITTEN = "tokvel_writer_rows_written_total"
# Every row's identity and the columns the velocity rules computed, in one digest.
DIGEST = """
SELECT count(*) AS rows, md5(string_agg(
    concat_ws(',', t.cmc_id, m."timestamp", m.velocity, m.velocity_1h, m.velocity_4h,
              m.velocity_12h, m.velocity_24h, m.velocity_7d, m.trend, m.data_quality_score,
              m.quality_flags),
    ';' ORDER BY t.cmc_id, m."timestamp")) AS digest
FROM token_metrics m JOIN tokens t ON t.id = m.token_id
"""


@dataclass(frozen=True)
class Outcome:
    seconds: float
    rows: int
    cpu_seconds: dict[str, float]
    first_row_seconds: float | None = None  # tokvel: from start to its first committed row


# ------------------------------------------------------------------------------- publishing


async def publish(env: Mapping[str, str], data: Path, samples: int, logs: Path) -> float:
    """``tokvel backfill`` of the first ``samples`` recorded quotes; returns its seconds."""
    started = time.perf_counter()
    process = await start_service(
        ["backfill", str(data), "--limit", str(samples), "--api-version", "v3", "--restart",
         "--no-progress", "--batch-size", str(PUBLISH_BATCH)],
        env, logs / "backfill.log",
    )  # fmt: skip
    if await process.wait() != 0:
        raise RuntimeError(f"tokvel backfill exited with {process.returncode}")
    return time.perf_counter() - started


async def end_offsets(bootstrap_servers: str, prefix: str) -> dict[TopicPartition, int]:
    """Where each partition of the raw topic ends (scratch_topics created it with the spec's
    partition count)."""
    topic = prefixed(prefix, RAW_QUOTES)
    partitions = next(spec.partitions for spec in TOPICS if spec.name == RAW_QUOTES)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers)
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(
            [TopicPartition(topic, p) for p in range(partitions)]
        )
        return ends
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------------- baseline


class PlainPipeline:
    """The velocity rules and the writer's persistence as plain calls in one process."""

    def __init__(self, repository: WriterRepository, days: PartitionDays) -> None:
        self._repository = repository
        self._days = days
        self._windows: dict[bytes, TokenWindows] = {}
        self._future_skew = timedelta(seconds=VelocitySettings().velocity_future_skew_seconds)

    def samples(self, records: list[Any]) -> list[MetricsSample]:
        out: list[MetricsSample] = []
        for record in records:
            result = validate(record.key, record.value, future_skew=self._future_skew)
            if isinstance(result, Rejection):
                continue  # the worker's dead letters: not a row
            windows = self._windows.get(result.key)
            if windows is None:
                windows = self._windows[result.key] = TokenWindows(RECORDING_INTERVAL_SECONDS)
            applied = apply(result, windows)
            if applied.sample is not None:  # else a duplicate or too late: no sample either
                out.append(applied.sample)
        return out

    async def write(self, samples: list[MetricsSample]) -> WriteResult:
        await self._days.prepare({event_day(s.ts) for s in samples})
        return await self._repository.write_batch(batch_rows(samples, []))


async def run_baseline(
    settings: CommonSettings, prefix: str, dsn: str, ends: dict[TopicPartition, int]
) -> Outcome:
    batch_size = WriterSettings().writer_batch_max_rows
    cpu_before = time.process_time()
    started = time.perf_counter()
    pool = await create_pool(dsn, min_size=1, max_size=2, application_name="bench-baseline")
    repository = WriterRepository(pool)
    pipeline = PlainPipeline(
        repository, PartitionDays(repository, WriterMetrics(CollectorRegistry()))
    )
    consumer = create_consumer(
        prefixed(prefix, RAW_QUOTES),
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=prefixed(prefix, "bench-baseline"),
        client_id="bench-baseline",
    )
    await consumer.start()
    rows = 0
    remaining = {tp: end for tp, end in ends.items() if end > 0}
    in_flight: tuple[asyncio.Task[WriteResult], dict[TopicPartition, int]] | None = None

    async def settle() -> None:
        nonlocal rows, in_flight
        if in_flight is not None:
            task, offsets = in_flight
            in_flight = None
            rows += (await task).rows_inserted
            await consumer.commit(offsets)

    next_progress = started + PROGRESS_SECONDS
    try:
        while remaining:
            if time.perf_counter() >= next_progress:
                say(f"  baseline: {rows:,} rows after {time.perf_counter() - started:.0f} s")
                next_progress += PROGRESS_SECONDS
            records = await consumer.getmany(timeout_ms=500, max_records=batch_size)
            if not records:
                continue
            samples: list[MetricsSample] = []
            offsets: dict[TopicPartition, int] = {}
            for tp, partition_records in records.items():
                samples.extend(pipeline.samples(partition_records))
                offsets[tp] = partition_records[-1].offset + 1
                if offsets[tp] >= remaining.get(tp, 0):
                    remaining.pop(tp, None)
            # The next poll is decoded while this batch is in PostgreSQL (as the writer does).
            await settle()
            in_flight = (asyncio.create_task(pipeline.write(samples)), offsets)
        await settle()
    finally:
        if in_flight is not None:
            in_flight[0].cancel()
        await consumer.stop()
        await pool.close()
    return Outcome(
        time.perf_counter() - started, rows, {"baseline": time.process_time() - cpu_before}
    )


# ---------------------------------------------------------------------------------- tokvel


async def run_tokvel(
    env: Mapping[str, str], workers: int, port_base: int, rows: int, logs: Path, data_dir: Path
) -> Outcome:
    writer_port = port_base
    writer_env = {
        **env,
        "WRITER_OPS_HOST": "127.0.0.1",
        "WRITER_OPS_PORT": str(writer_port),
    }
    processes: dict[str, asyncio.subprocess.Process] = {}
    started = time.perf_counter()
    try:
        processes["writer"] = await start_service(
            ["run", "writer"], writer_env, logs / "writer.log"
        )
        for number in range(workers):
            worker_env = {
                **env,
                "VELOCITY_OPS_HOST": "127.0.0.1",
                "VELOCITY_OPS_PORT": str(port_base + 1 + number),
                "VELOCITY_DATA_DIR": str(data_dir / f"velocity-{number}"),
                "VELOCITY_EXPECTED_INTERVAL_SECONDS": str(RECORDING_INTERVAL_SECONDS),
            }
            processes[f"velocity-{number}"] = await start_service(
                ["run", "velocity"], worker_env, logs / f"velocity-{number}.log"
            )
        url = f"http://127.0.0.1:{writer_port}/metrics"
        first_row: float | None = None
        written = 0.0
        next_progress = started + PROGRESS_SECONDS
        async with aiohttp.ClientSession() as session:
            while written < rows:
                for name, process in processes.items():
                    if process.returncode is not None:
                        raise RuntimeError(f"{name} exited with {process.returncode}")
                scraped = await scrape(session, url)
                now = time.perf_counter()
                written = (scraped or {}).get((ROWS_WRITTEN, ()), 0.0)
                if written and first_row is None:
                    first_row = now - started
                if now >= next_progress:
                    say(f"  tokvel: {written:,.0f}/{rows:,} rows after {now - started:.0f} s")
                    next_progress += PROGRESS_SECONDS
                if written < rows:
                    await asyncio.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - started
        cpu = {name: cpu_seconds(process.pid) for name, process in processes.items()}
        return Outcome(seconds, int(written), cpu, first_row)
    finally:
        await asyncio.gather(*(stop_process(p) for p in processes.values()))


async def digest(dsn: str) -> tuple[int, str]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(DIGEST)
    finally:
        await conn.close()
    assert row is not None
    return int(row["rows"]), str(row["digest"])


# ------------------------------------------------------------------------------------ main


async def measure(args: argparse.Namespace) -> Figure:
    base = CommonSettings()
    redis_url = with_path(base.redis_url.get_secret_value(), f"/{args.redis_db}")
    redis = Redis.from_url(redis_url)
    await redis.flushdb()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        logs = Path(scratch)
        try:
            async with (
                scratch_topics(base.kafka_bootstrap_servers, "pipeline") as prefix,
                scratch_database(base.database_url.get_secret_value(), "plain") as plain_dsn,
                scratch_database(base.database_url.get_secret_value(), "tokvel") as tokvel_dsn,
            ):
                env = {
                    **os.environ,
                    "KAFKA_BOOTSTRAP_SERVERS": base.kafka_bootstrap_servers,
                    "TOPIC_PREFIX": prefix,
                    "REDIS_URL": redis_url,
                    "DATABASE_URL": tokvel_dsn,
                    "LOG_LEVEL": "WARNING",
                }
                data = base.tokvel_replay_data
                publish_seconds = await publish(env, data, args.samples, logs)
                ends = await end_offsets(base.kafka_bootstrap_servers, prefix)
                quotes = sum(ends.values())
                if quotes == 0:
                    raise RuntimeError("nothing was published")
                say(f"published {quotes:,} recorded quotes of {data.name} in "
                    f"{publish_seconds:.1f} s (tokvel backfill)")  # fmt: skip

                say("baseline: plain aiokafka consumer -> velocity rules -> writer's code")
                plain = await run_baseline(base, prefix, plain_dsn, ends)
                say(f"  {plain.rows:,} rows in {plain.seconds:.1f} s "
                    f"({plain.rows / plain.seconds:,.0f} rows/s)")  # fmt: skip

                say(f"tokvel: {args.workers} velocity worker(s) + 1 writer, as processes")
                ours = await run_tokvel(
                    env, args.workers, args.port_base, plain.rows, logs, Path(scratch)
                )
                say(f"  {ours.rows:,} rows in {ours.seconds:.1f} s "
                    f"({ours.rows / ours.seconds:,.0f} rows/s; first row after "
                    f"{ours.first_row_seconds or 0:.1f} s)")  # fmt: skip
                plain_digest, tokvel_digest = await digest(plain_dsn), await digest(tokvel_dsn)
        except BaseException:
            show_logs(logs)
            raise
        finally:
            await redis.flushdb()
            await redis.aclose()
    same = plain_digest == tokvel_digest
    if not same:
        say(f"  the two databases differ: baseline {plain_digest}, tokvel {tokvel_digest}")
    ratio = ours.seconds / plain.seconds
    return Figure(
        figure=f"pipeline: recorded week ({quotes:,} quotes) raw -> PostgreSQL, wall time",
        unit="s",
        tokvel=ours.seconds,
        target=f"<= {TARGET_RATIO:g}x baseline",
        met=ratio <= TARGET_RATIO and same,
        baseline=plain.seconds,
        baseline_name="plain aiokafka consumer -> velocity rules -> writer's code, no Faust",
        ratio=ratio,
        detail={
            "quotes": quotes,
            "rows": plain.rows,
            "baseline_rejected_or_duplicate": quotes - plain.rows,
            "same_rows": same,
            "velocity_workers": args.workers,
            "publish_seconds": publish_seconds,
            "tokvel_first_row_seconds": ours.first_row_seconds,
            "tokvel_rows_per_second": ours.rows / ours.seconds,
            "baseline_rows_per_second": plain.rows / plain.seconds,
            "cpu_seconds": {**plain.cpu_seconds, **ours.cpu_seconds},
        },
    )


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--samples", type=int, default=RECORDED_WEEK_SAMPLES,
        help=f"quotes of the recording to replay (default: the whole week, "
        f"{RECORDED_WEEK_SAMPLES})",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="velocity workers (default 1)")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds, overall")
    parser.add_argument("--port-base", type=int, default=18420, help="writer; workers above it")
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--json", type=Path, help="write the figure there (bench/report.py)")
    args = parser.parse_args(argv)
    async with asyncio.timeout(args.time_limit):
        figure = await measure(args)
    say(f"tokvel / baseline wall time: {figure.ratio:.2f}x (target <= {TARGET_RATIO:g}x)")
    if args.json:
        write_figures(args.json, [figure])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
