"""Quotes per second of one velocity worker, against a bare Faust agent on the same backlog.

    .venv/bin/python bench/velocity_throughput.py [--quotes 100000] [--rounds 3] [--no-baseline]
                                                  [--time-limit 300] [--json PATH]

Against the local stack (KAFKA_BOOTSTRAP_SERVERS): each round publishes ``--quotes`` real
recorded quotes (TOKVEL_REPLAY_DATA, in the CMC v3 shape the replay server serves, keyed by
cmc_id as the ingestor publishes them) into a fresh ``cmc.quotes.raw`` under a topic prefix of
its own, then

* runs one velocity worker (``tokvel run velocity``, default settings) on that backlog and reads
  ``velocity_quotes_consumed_total`` from its /metrics every 0.25 s until every quote is
  consumed: quotes/s = quotes consumed after the first poll that saw any / the time since;
* runs the baseline, ``bench/bare_faust_agent.py``: a Faust agent on the same topic definition
  (raw bytes) that does nothing per message, timed from its first message to its last.

The two run one after the other (never at once), alternating which goes first. Each reports
quotes per second and quotes per CPU second of its process (all threads), which a busy machine
moves much less. The figure is the best round of each (noise only ever slows a round down);
every round is in ``detail``. Each process and each round is bounded in time
(``--time-limit``); the round's topics, the worker's changelog included, are deleted after it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import cpu_seconds, say, scrape, scratch_topics, start_service, stop_process
from bench.report import Figure, write_figures
from ingestor.replay_data import iter_snapshots, to_cmc_entry
from tokvel_common.events import RawQuote
from tokvel_common.infra import kafka as local_kafka
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.process import live_pid
from tokvel_common.kafka import create_producer
from tokvel_common.serialization import encode, encode_key
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import RAW_QUOTES, prefixed

ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.25
OPS_PORT = 18710  # bench workers listen on 18710, 18711, ... (this benchmark's port range)
CONSUMED = "velocity_quotes_consumed_total"
RECORDING_INTERVAL_SECONDS = 300


def recorded_quotes(path: Path, limit: int) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of the first ``limit`` recorded quotes, as the ingestor would publish them."""
    count = 0
    for snapshot in iter_snapshots(path):
        for row in snapshot.rows:
            quote = RawQuote.model_validate(
                {
                    **to_cmc_entry(row, "v3"),
                    "polled_at": snapshot.ts,
                    "listed_at": snapshot.ts,
                    "source": "bench",
                    "poll_id": f"bench-{snapshot.index}",
                }
            )
            yield encode_key(quote.id), encode(quote)
            count += 1
            if count == limit:
                return


async def publish_backlog(settings: CommonSettings, prefix: str, limit: int) -> dict[int, int]:
    """The recorded quotes into ``cmc.quotes.raw``; how many went to each partition."""
    producer = create_producer(settings.kafka_bootstrap_servers, client_id="bench")
    await producer.start()
    try:
        topic = prefixed(prefix, RAW_QUOTES)
        deliveries = [
            await producer.send(topic, value, key=key)
            for key, value in recorded_quotes(settings.tokvel_replay_data, limit)
        ]
        per_partition: dict[int, int] = {}
        for metadata in await asyncio.gather(*deliveries):
            per_partition[metadata.partition] = per_partition.get(metadata.partition, 0) + 1
    finally:
        await producer.stop()
    return dict(sorted(per_partition.items()))


def broker_pid() -> int | None:
    """The local stack's Kafka broker (TOKVEL_RUN_DIR), to read its CPU time; else None."""
    paths = local_kafka.locate(Layout.from_environment())
    return live_pid(paths.pid, paths.markers)


@dataclass(frozen=True)
class Rate:
    quotes: int  # quotes in the measured span
    seconds: float
    cpu_seconds: float  # of the measured processes, every thread
    broker_cpu_seconds: float | None = None  # of the local broker over the same span

    @property
    def per_second(self) -> float:
        return self.quotes / self.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.quotes / self.cpu_seconds

    def describe(self) -> str:
        return f"{self.per_second:,.0f} quotes/s ({self.per_cpu_second:,.0f} per CPU second)"

    def as_detail(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "per_second": self.per_second,
            "per_cpu_second": self.per_cpu_second,
        }


@dataclass(frozen=True)
class WorkersRun:
    rate: Rate
    consumed: list[int]  # by each worker in the measured span


def worker_environment(
    env: dict[str, str], prefix: str, index: int, data_dir: str
) -> dict[str, str]:
    return {
        **env,
        "TOPIC_PREFIX": prefix,
        "VELOCITY_OPS_HOST": "127.0.0.1",
        "VELOCITY_OPS_PORT": str(OPS_PORT + index),
        "VELOCITY_DATA_DIR": str(Path(data_dir) / f"worker-{index}"),
        "VELOCITY_EXPECTED_INTERVAL_SECONDS": str(RECORDING_INTERVAL_SECONDS),
        "LOG_LEVEL": "WARNING",
    }


async def run_workers(
    env: dict[str, str], prefix: str, workers: int, backlog: int, time_limit: float, logs: Path
) -> WorkersRun:
    """``workers`` velocity workers, started together, until they consumed the ``backlog``.

    The measured span starts at the first poll at which every worker has consumed something
    (each holds partitions and the group has settled) and ends when the backlog is consumed.
    """
    with tempfile.TemporaryDirectory(prefix="velocity-bench-") as data_dir:
        processes = [
            await start_service(
                ["run", "velocity"],
                worker_environment(env, prefix, index, data_dir),
                logs / f"worker-{index}.log",
            )
            for index in range(workers)
        ]
        urls = [f"http://127.0.0.1:{OPS_PORT + index}/metrics" for index in range(workers)]
        broker = broker_pid()
        try:
            async with aiohttp.ClientSession() as session, asyncio.timeout(time_limit):
                start: tuple[float, float, float | None, list[int]] | None = None
                while True:
                    for process in processes:
                        if process.returncode is not None:
                            raise RuntimeError(f"a worker exited with {process.returncode}")
                    consumed = [await consumed_by(session, url) for url in urls]
                    now = time.perf_counter()
                    cpu = sum(cpu_seconds(p.pid) for p in processes)
                    broker_cpu = cpu_seconds(broker) if broker is not None else None
                    if start is None and all(consumed):
                        start = (now, cpu, broker_cpu, consumed)
                    if start is not None and sum(consumed) >= backlog:
                        first_time, first_cpu, first_broker, first_consumed = start
                        broker_span = (
                            None
                            if broker_cpu is None or first_broker is None
                            else broker_cpu - first_broker
                        )
                        in_span = [c - f for c, f in zip(consumed, first_consumed, strict=True)]
                        span = Rate(sum(in_span), now - first_time, cpu - first_cpu, broker_span)
                        return WorkersRun(span, in_span)
                    await asyncio.sleep(POLL_SECONDS)
        except BaseException:
            for index in range(workers):
                log = logs / f"worker-{index}.log"
                say(f"worker {index} log tail:\n" + "\n".join(log.read_text().splitlines()[-20:]))
            raise
        finally:
            await asyncio.gather(*(stop_process(p) for p in processes))


async def consumed_by(session: aiohttp.ClientSession, url: str) -> int:
    """A worker's velocity_quotes_consumed_total; 0 while it does not answer yet."""
    samples = await scrape(session, url)
    return int(samples.get((CONSUMED, ()), 0)) if samples else 0


async def run_bare_agent(env: dict[str, str], prefix: str, backlog: int, time_limit: float) -> Rate:
    bare_env = {**env, "TOPIC_PREFIX": prefix, "BENCH_QUOTES": str(backlog)}
    with tempfile.TemporaryDirectory(prefix="velocity-bench-bare-") as data_dir:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bench" / "bare_faust_agent.py"),
            cwd=ROOT, env={**bare_env, "BENCH_DATA_DIR": data_dir},
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        try:
            async with asyncio.timeout(time_limit):
                while line := await process.stdout.readline():
                    if line.startswith(b"{"):
                        report = orjson.loads(line)
                        # Timed from its first message: the backlog after that one.
                        return Rate(backlog - 1, report["seconds"], report["cpu_seconds"])
            raise RuntimeError("the bare agent exited without a report")
        finally:
            await stop_process(process)


@dataclass(frozen=True)
class Round:
    backlog: int
    per_partition: dict[int, int]
    worker: Rate
    bare: Rate | None


async def measure_round(
    settings: CommonSettings, args: argparse.Namespace, number: int, logs: Path
) -> Round:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers}
    async with scratch_topics(settings.kafka_bootstrap_servers, "velocity") as prefix:
        per_partition = await publish_backlog(settings, prefix, args.quotes)
        backlog = sum(per_partition.values())
        bare: Rate | None = None
        # Alternate which goes first: a machine that gets busier or quieter favours neither.
        if args.baseline and number % 2 == 0:
            bare = await run_bare_agent(env, prefix, backlog, args.time_limit)
        worker = await run_workers(env, prefix, 1, backlog, args.time_limit, logs)
        if args.baseline and number % 2 == 1:
            bare = await run_bare_agent(env, prefix, backlog, args.time_limit)
        return Round(backlog, per_partition, worker.rate, bare)


def best(rates: Sequence[Rate]) -> tuple[float, float]:
    """The best quotes/s and the best quotes per CPU second of the rounds."""
    return max(r.per_second for r in rates), max(r.per_cpu_second for r in rates)


async def run(args: argparse.Namespace) -> list[Figure]:
    settings = CommonSettings()
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="velocity-bench-logs-") as logs:
        for number in range(1, args.rounds + 1):
            result = await measure_round(settings, args, number, Path(logs))
            rounds.append(result)
            line = f"round {number}: {result.backlog} quotes; "
            line += f"velocity worker {result.worker.describe()}"
            if result.bare is not None:
                line += f"; bare Faust agent {result.bare.describe()}"
            say(line)
    worker_best, worker_best_cpu = best([r.worker for r in rounds])
    say(f"velocity worker: {worker_best:,.0f} quotes/s, {worker_best_cpu:,.0f} per CPU second")
    detail: dict[str, Any] = {
        "backlog": rounds[0].backlog,
        "per_cpu_second": worker_best_cpu,
        "rounds": [
            {"worker": r.worker.as_detail(), "bare": r.bare.as_detail() if r.bare else None}
            for r in rounds
        ],
        "data": settings.tokvel_replay_data.name,
    }
    bares = [r.bare for r in rounds if r.bare is not None]
    if not bares:
        return [
            Figure(
                "velocity worker quotes/s", "quotes/s", worker_best, "≥50% of baseline", False,
                detail=detail,
            )
        ]  # fmt: skip
    bare_best, bare_best_cpu = best(bares)
    ratio = worker_best / bare_best
    detail["baseline_per_cpu_second"] = bare_best_cpu
    detail["ratio_per_cpu_second"] = worker_best_cpu / bare_best_cpu
    say(f"bare Faust agent: {bare_best:,.0f} quotes/s, {bare_best_cpu:,.0f} per CPU second")
    say(
        f"velocity / bare: {ratio:.1%} of the quotes/s, "
        f"{worker_best_cpu / bare_best_cpu:.1%} per CPU second (target: 50% of the quotes/s)"
    )
    say(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    return [
        Figure(
            "velocity worker quotes/s", "quotes/s", worker_best, "≥50% of baseline", ratio >= 0.5,
            baseline=bare_best, baseline_name="bare Faust agent iterating the same topic",
            ratio=ratio, detail=detail,
        )
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quotes", type=int, default=100_000, help="backlog (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh topics each (default 3)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument(
        "--time-limit", type=float, default=300.0, help="seconds per process (default 300)"
    )
    parser.add_argument("--json", type=Path, help="write the figures there (bench/report.py)")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    if args.json is not None:
        write_figures(args.json, figures)


if __name__ == "__main__":
    main()
