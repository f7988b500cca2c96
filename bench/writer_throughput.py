"""Rows/s persisted by one writer vs a raw ``copy_records_to_table`` into the same table.

    .venv/bin/python bench/writer_throughput.py [--samples 100000] [--rounds 1]
                                                [--time-limit 300] [--json PATH]
                                                [--redis-db 12] [--ops-port PORT]
                                                [--database-prefix tokvel_bench_]

Both use the same real samples (TOKVEL_REPLAY_DATA, read in place) and the same emptied
``token_metrics`` table of a database created for the run, on the local stack:

* raw (the baseline): the rows, already converted to column values (numeric columns as exact
  ``Decimal`` through ``as_numeric``, as the writer converted them before it wrote COPY text),
  in one ``copy_records_to_table`` (asyncpg's binary COPY) straight into ``token_metrics``
  (tokens and partitions created beforehand; only the COPY is timed).
* writer: the same samples on ``token.metrics`` (produced beforehand, not timed), consumed by
  one writer process (``python -m writer``) with its default settings. Timed from its first
  durable batch to its last, seen in the offsets its consumer group commits (right after each
  batch's transaction); the rows of the first batch are not counted. Its
  ``tokvel_writer_rows_written_total`` must then equal the samples.
* for context (``detail``): the writer's own COPY text of the same rows, prebuilt, in one
  ``copy_to_table``: what PostgreSQL takes in the encoding the writer uses.

Raw runs come before the first writer run and after each one (``--rounds`` writer runs, each a
consumer group of its own); the figure compares the medians. Each run also reports the CPU it
cost per row in the client (this process for a raw COPY; the writer's and its workers) and in
PostgreSQL's backends: on this shared machine other load moves the rates, much less the cost
per row.

Everything the run creates (database, topics prefixed with TOPIC_PREFIX, the keys of Redis
database ``--redis-db``) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CoordinatorLoadInProgressError, GroupCoordinatorNotAvailableError
from pydantic import SecretStr
from redis.asyncio import Redis

# The recorded-data helpers are the tests' (bench and tests replay the same real samples).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import say, scratch_database, with_path
from bench.report import Figure, write_figures
from tests.support.kafka import produce, tokvel_topics
from tests.support.recorded import metric_record, metrics_sample, recorded_rows
from tests.support.writer import environment, free_port
from tokvel_common.events import MetricsSample
from tokvel_common.topics import METRICS, prefixed
from writer.repository import METRIC_COLUMNS, copy_line
from writer.settings import WriterSettings

START, END = "2017-08-10T00:00:00Z", "2017-08-18T00:00:00Z"  # the whole recorded week
TARGET_RATIO = 0.6
# The writer prepares the next batches while it writes one; those ready before its first
# commit (the start of the timing) cost less time than the rest: a few must not make the rate.
MIN_BATCHES = 8
ROWS_WRITTEN = re.compile(rb"^tokvel_writer_rows_written_total (\S+)$", re.MULTILINE)
BATCH_SECONDS = re.compile(rb"^tokvel_writer_batch_latency_seconds_sum (\S+)$", re.MULTILINE)
PROGRESS_SECONDS = 0.05
EMPTY_TABLES = "TRUNCATE token_metrics, token_latest"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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


@dataclass(frozen=True)
class Run:
    """One measured run: its rate, and the CPU it cost per row on each side of the socket (load
    on this shared machine moves the rate, much less what each row costs)."""

    rows_per_second: float
    seconds: float
    client_cpu_us_per_row: float  # this process (asyncpg), or the writer's and its workers
    postgres_cpu_us_per_row: float  # the database's backends

    def summary(self) -> str:
        return (
            f"{self.rows_per_second:>9,.0f} rows/s, CPU per row: "
            f"{self.client_cpu_us_per_row:5.1f} us client + "
            f"{self.postgres_cpu_us_per_row:5.1f} us PostgreSQL"
        )


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command (state first); none once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _process_cpu_seconds(pid: int | str) -> float:
    """User + system CPU of a process of this machine (0 once it is gone)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields else 0.0


def _tree_cpu_seconds(pid: int) -> float:
    """The CPU of a process and of its live children (the writer's worker processes)."""
    children = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]
    return _process_cpu_seconds(pid) + sum(
        _process_cpu_seconds(child) for child in children if _stat(child)[1:2] == [str(pid)]
    )


async def _backends_cpu(probe: asyncpg.Connection) -> dict[int, float]:
    """CPU seconds of every other backend of the probe's database (the stack runs locally)."""
    pids = await probe.fetch(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return {r["pid"]: _process_cpu_seconds(r["pid"]) for r in pids}


def _cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


async def _timed_copy(
    dsn: str, rows: int, copy: Callable[[asyncpg.Connection], Awaitable[Any]]
) -> Run:
    """``copy`` into the emptied token_metrics; only the copy itself is timed."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(EMPTY_TABLES)  # the same, empty table
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        server_before, client_before = _process_cpu_seconds(backend), time.process_time()
        started = time.perf_counter()
        await copy(conn)
        elapsed = time.perf_counter() - started
        client = time.process_time() - client_before
        server = _process_cpu_seconds(backend) - server_before
    finally:
        await conn.close()
    return Run(rows / elapsed, elapsed, client / rows * 1e6, server / rows * 1e6)


async def raw_copy(dsn: str, samples: list[MetricsSample], ids: dict[int, int]) -> Run:
    """The baseline: one copy_records_to_table of prebuilt rows into token_metrics."""
    records = [metric_record(ids[s.cmc_id], s) for s in samples]
    return await _timed_copy(
        dsn,
        len(records),
        lambda conn: conn.copy_records_to_table(
            "token_metrics", records=records, columns=METRIC_COLUMNS
        ),
    )


async def raw_text_copy(dsn: str, samples: list[MetricsSample], ids: dict[int, int]) -> Run:
    """Context: one copy_to_table of the writer's own COPY text of the same rows, prebuilt."""
    data = "".join(f"{ids[s.cmc_id]}\t{copy_line(s)}\n" for s in samples).encode()

    async def chunks() -> AsyncIterator[bytes]:  # plain bytes would be read as a file name
        yield data

    return await _timed_copy(
        dsn,
        len(samples),
        lambda conn: conn.copy_to_table(
            "token_metrics", source=chunks(), columns=METRIC_COLUMNS, format="text"
        ),
    )


async def _scrape(session: aiohttp.ClientSession, port: int) -> bytes:
    try:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            return await response.read()
    except aiohttp.ClientError:
        return b""


def _value(pattern: re.Pattern[bytes], text: bytes) -> float:
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


async def writer_run(settings: WriterSettings, dsn: str, total: int) -> tuple[Run, float]:
    """One writer process from its first committed row to its last (the rows of its first batch
    are not counted); and the seconds of that spent inside batch transactions."""
    with tempfile.TemporaryFile() as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "writer",
            env={**os.environ, **environment(settings)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            return await _follow_writer(process, settings, dsn, total)
        except Exception:
            log.seek(0)
            sys.stdout.write(log.read().decode(errors="replace")[-5000:])
            raise
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 60)


async def _durable_messages(admin: AIOKafkaAdminClient, group: str) -> int:
    """Messages the group has committed: their rows are durable (offsets start at 0)."""
    try:
        committed = await admin.list_consumer_group_offsets(group)
    except (GroupCoordinatorNotAvailableError, CoordinatorLoadInProgressError):
        # A broker just started has no offsets topic yet: nothing is committed so far.
        return 0
    return sum(max(0, position.offset) for position in committed.values())


async def _follow_writer(
    process: asyncio.subprocess.Process, settings: WriterSettings, dsn: str, total: int
) -> tuple[Run, float]:
    # Progress is read from the group's committed offsets, from the broker: scraping the
    # writer's /metrics this often would cost the writer itself a few percent.
    group = prefixed(settings.topic_prefix, settings.writer_group_id)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    probe = await asyncpg.connect(dsn)
    first: tuple[float, int, float, dict[int, float]] | None = None
    try:
        while True:
            durable = await _durable_messages(admin, group)
            now = time.perf_counter()
            if first is None and durable > 0:
                cpu = _tree_cpu_seconds(process.pid)
                first = (now, durable, cpu, await _backends_cpu(probe))
            if durable >= total:
                client = _tree_cpu_seconds(process.pid)
                server = await _backends_cpu(probe)
                break
            if process.returncode is not None:
                raise RuntimeError("the writer stopped before writing every row")
            await asyncio.sleep(PROGRESS_SECONDS)
        async with aiohttp.ClientSession() as session:
            scraped = await _scrape(session, settings.writer_ops_port)
    finally:
        await probe.close()
        await admin.close()
    if _value(ROWS_WRITTEN, scraped) != total:
        raise RuntimeError(f"the writer wrote {_value(ROWS_WRITTEN, scraped)} rows, not {total}")
    assert first is not None
    first_at, first_durable, client_before, server_before = first
    counted, elapsed = total - first_durable, now - first_at
    if counted == 0:
        raise RuntimeError("one batch held every sample: give more --samples than a batch holds")
    run = Run(
        counted / elapsed,
        elapsed,
        (client - client_before) / counted * 1e6,
        _cpu_since(server_before, server) / counted * 1e6,
    )
    return run, _value(BATCH_SECONDS, scraped)


async def _truncate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(EMPTY_TABLES)
    finally:
        await conn.close()


@dataclass(frozen=True)
class Isolation:
    """What the run may use of the shared stack (helpers running side by side each get their
    own)."""

    redis_db: int
    ops_port: int | None  # None: any free port
    database_prefix: str


async def measure(
    base: WriterSettings, samples: list[MetricsSample], rounds: int, isolation: Isolation
) -> Figure:
    """Raw COPYs and writer runs in turn (raw, writer, raw, ... raw), on the same empty table;
    the medians count."""
    redis_url = with_path(base.redis_url.get_secret_value(), f"/{isolation.redis_db}")
    prefix = f"{base.topic_prefix}bench-{uuid.uuid4().hex[:8]}."
    raws: list[Run] = []
    texts: list[Run] = []
    writers: list[Run] = []
    batch_seconds: list[float] = []
    redis = Redis.from_url(redis_url)
    try:
        async with (
            scratch_database(
                base.database_url.get_secret_value(), "writer", prefix=isolation.database_prefix
            ) as dsn,
            tokvel_topics(base.kafka_bootstrap_servers, prefix),
        ):
            conn = await asyncpg.connect(dsn)
            try:
                ids = await prepare_table(conn, samples)
            finally:
                await conn.close()
            await produce(base.kafka_bootstrap_servers, prefixed(prefix, METRICS), [
                (s.cmc_id, s) for s in samples
            ])  # fmt: skip

            async def raw_round() -> None:
                raws.append(await raw_copy(dsn, samples, ids))
                say(f"raw copy_records_to_table:  {raws[-1].summary()}")
                texts.append(await raw_text_copy(dsn, samples, ids))
                say(f"raw copy_to_table (text):   {texts[-1].summary()}")

            await raw_round()
            for round_ in range(rounds):
                await _truncate(dsn)  # every writer starts from the same empty table
                await redis.flushdb()
                overrides: dict[str, Any] = {
                    "database_url": SecretStr(dsn),
                    "redis_url": SecretStr(redis_url),
                    "topic_prefix": prefix,
                    # A group of its own: each round reads the topic from its start.
                    "writer_group_id": f"bench-writer-{round_}",
                    "writer_ops_port": isolation.ops_port or free_port(),
                }
                settings = WriterSettings.model_validate({**dict(base), **overrides})
                run, in_batches = await writer_run(settings, dsn, len(samples))
                writers.append(run)
                batch_seconds.append(in_batches)
                say(f"one writer (Kafka -> PG):   {run.summary()}; {run.seconds:.1f} s, "
                    f"{in_batches:.1f} s of it in batch transactions")  # fmt: skip
                await raw_round()
    finally:
        await redis.flushdb()
        await redis.aclose()
    raw = statistics.median(r.rows_per_second for r in raws)
    writer = statistics.median(r.rows_per_second for r in writers)
    ratio = writer / raw
    say(f"writer / raw copy_records_to_table: {ratio:.0%} (target >= {TARGET_RATIO:.0%})")
    return Figure(
        figure="writer rows/s into token_metrics",
        unit="rows/s",
        tokvel=round(writer),
        target=f"≥{TARGET_RATIO:.0%} of baseline",
        met=ratio >= TARGET_RATIO,
        baseline=round(raw),
        baseline_name="raw copy_records_to_table",
        ratio=round(ratio, 3),
        detail={
            "samples": len(samples),
            "writer_batch_max_rows": base.writer_batch_max_rows,
            "writer_runs": [asdict(r) for r in writers],
            "writer_seconds_in_batch_transactions": batch_seconds,
            "raw_copy_records_runs": [asdict(r) for r in raws],
            "raw_copy_text_runs": [asdict(r) for r in texts],
        },
    )


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1, help="writer runs, each between raws")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds, overall")
    parser.add_argument("--json", type=Path, help="write the figure there (bench/report.py)")
    parser.add_argument("--redis-db", type=int, default=12, help="flushed before and after")
    parser.add_argument("--ops-port", type=int, help="the writer's /metrics (default: any free)")
    parser.add_argument("--database-prefix", default="tokvel_bench_", help="of the scratch db")
    args = parser.parse_args(argv)

    base = WriterSettings()
    if args.samples < MIN_BATCHES * base.writer_batch_max_rows:
        parser.error(
            f"--samples must be at least {MIN_BATCHES} batches "
            f"({MIN_BATCHES * base.writer_batch_max_rows} at WRITER_BATCH_MAX_ROWS="
            f"{base.writer_batch_max_rows}): the batches prepared before the first commit, "
            "which starts the clock, are not timed in full"
        )
    rows = recorded_rows(base.tokvel_replay_data, START, END)
    samples = [metrics_sample(row) for row in itertools.islice(rows, args.samples)]
    say(f"{len(samples)} real samples from {base.tokvel_replay_data.name}, "
        f"{samples[0].ts:%Y-%m-%d %H:%M} to {samples[-1].ts:%Y-%m-%d %H:%M}, "
        f"{len({s.cmc_id for s in samples})} tokens")  # fmt: skip
    async with asyncio.timeout(args.time_limit):
        isolation = Isolation(args.redis_db, args.ops_port, args.database_prefix)
        figure = await measure(base, samples, args.rounds, isolation)
    if args.json is not None:
        write_figures(args.json, [figure])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
