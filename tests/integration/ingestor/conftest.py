"""Helpers of the ingestor's integration tests: a real replay server on a free port, an
ingestor run in-process or as a process, and the raw-quotes topic read back to its end.

The recorded data is read where it lives (the ``tokvel_replay_data`` setting), never copied.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from aiohttp import web
from aiokafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from ingestor import app as ingestor_app
from ingestor.ledger import published_key, topic_partitions
from ingestor.metrics import IngestorMetrics
from ingestor.replay_server import create_app
from ingestor.settings import IngestorSettings, ReplaySettings
from tokvel_common.events import RawQuote
from tokvel_common.kafka import create_consumer
from tokvel_common.serialization import decode
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import RAW_QUOTES, prefixed

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def recorded_snapshots(path: Path, count: int | None) -> list[list[dict[str, Any]]]:
    """The first ``count`` snapshots of a recording, read independently of the replay code."""
    snapshots: list[list[dict[str, Any]]] = []
    with gzip.open(path, "rt") as stream:
        rows = (json.loads(line) for line in stream)
        for _, group in itertools.groupby(rows, key=lambda row: row["ts"]):
            snapshots.append(list(group))
            if count is not None and len(snapshots) == count:
                break
    return snapshots


def expected_keys(snapshots: list[list[dict[str, Any]]]) -> set[tuple[int, datetime]]:
    return {(r["cmc_id"], datetime.fromisoformat(r["ts"])) for s in snapshots for r in s}


@dataclass
class ReplayServer:
    url: str
    session: aiohttp.ClientSession

    async def state(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/_replay/state") as response:
            body: dict[str, Any] = await response.json()
            return body

    async def arm(self, *faults: str) -> None:
        async with self.session.post(
            f"{self.url}/_replay/faults", json={"faults": list(faults)}
        ) as response:
            assert response.status == 200, await response.text()

    async def wait(self, condition: str, predicate: Any, within: float = 60.0) -> dict[str, Any]:
        """Poll the replay's state until ``predicate(state)``; fails naming ``condition``."""
        try:
            async with asyncio.timeout(within):
                # The state is the server's: there is no event to await.
                while not predicate(state := await self.state()):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pytest.fail(f"timed out waiting until {condition}: {await self.state()}")
        return state


@asynccontextmanager
async def replay_server(
    data: Path, *, snapshots: int | None, faults: tuple[str, ...] = ()
) -> AsyncIterator[ReplayServer]:
    settings = ReplaySettings(
        tokvel_replay_data=data, replay_snapshots=snapshots, replay_faults=list(faults)
    )
    # A short shutdown: a test ends while a `slow` fault may still be sleeping in a handler.
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            yield ReplayServer(f"http://127.0.0.1:{port}", session)
    finally:
        await runner.cleanup()


def ingestor_settings(
    settings: CommonSettings, topic_prefix: str, redis_url: str, cmc_url: str, **overrides: Any
) -> IngestorSettings:
    """Fast settings: short interval, lease, backoff and rate-limit window."""
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": settings.kafka_bootstrap_servers,
        "redis_url": redis_url,
        "topic_prefix": topic_prefix,
        "cmc_base_url": cmc_url,
        "poll_interval_seconds": 0.2,
        "cmc_page_limit": 5000,
        "cmc_request_timeout_seconds": 1.0,
        "cmc_backoff_base_seconds": 0.05,
        "cmc_backoff_max_seconds": 0.3,
        "cmc_rate_limit_window_seconds": 1.0,
        "ingestor_lease_ttl_seconds": 1.5,
        "ingestor_ops_port": 0,
        "ingestor_linger_ms": 5,
    }
    values.update(overrides)
    return IngestorSettings(**values)


def as_env(settings: IngestorSettings) -> dict[str, str]:
    """The settings as the environment of an ingestor process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CMC_", "INGESTOR_"))}
    for name, value in settings.model_dump().items():
        secret = getattr(value, "get_secret_value", None)
        env[name.upper()] = str(secret() if secret else value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class RunningIngestor:
    metrics: IngestorMetrics
    stop: asyncio.Event
    task: asyncio.Task[int]

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def running_ingestor(settings: IngestorSettings) -> AsyncIterator[RunningIngestor]:
    """The ingestor in this process, stopped like SIGTERM stops it when the block ends."""
    stop = asyncio.Event()
    metrics = IngestorMetrics()
    task = asyncio.create_task(ingestor_app.run(settings, stop, metrics))
    running = RunningIngestor(metrics, stop, task)
    try:
        yield running
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def wait_until(condition: str, predicate: Any, within: float = 60.0) -> None:
    """Until ``predicate()`` holds (metrics another task or process updates: no event to await)."""
    try:
        async with asyncio.timeout(within):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out waiting until {condition}")


async def start_process(settings: IngestorSettings, log_path: Path) -> asyncio.subprocess.Process:
    """``tokvel run ingestor`` as its own process (its log in ``log_path``)."""
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ingestor",
            cwd=PROJECT_ROOT, env=as_env(settings), stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip


async def scrape(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    """``/metrics`` of an ingestor process as ``{"name{label=value}": value}``."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def read_topic(bootstrap_servers: str, topic: str) -> list[RawQuote]:
    """Every quote of ``topic`` from its start to its current end."""
    return [decode(value, RawQuote) for value in await read_values(bootstrap_servers, topic)]


async def read_values(bootstrap_servers: str, topic: str) -> list[bytes]:
    """Every message value of ``topic`` from its start to its current end."""
    partitions = [
        TopicPartition(topic, p) for p in await topic_partitions(bootstrap_servers, topic)
    ]
    consumer = create_consumer(bootstrap_servers=bootstrap_servers, group_id=None, client_id="t")
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        values: list[bytes] = []
        todo = {tp for tp in partitions if ends[tp] > 0}
        while todo:
            for records in (await consumer.getmany(*todo, timeout_ms=1000)).values():
                values.extend(r.value for r in records if r.value is not None)
            todo = {tp for tp in todo if await consumer.position(tp) < ends[tp]}
        return values
    finally:
        await consumer.stop()


def raw_topic(prefix: str) -> str:
    return prefixed(prefix, RAW_QUOTES)


def key_counts(quotes: list[RawQuote]) -> Counter[tuple[int, datetime]]:
    counts: Counter[tuple[int, datetime]] = Counter()
    for quote in quotes:
        event_time = quote.event_time()
        assert event_time is not None
        counts[(quote.id, event_time)] += 1
    assert all(published_key(q)[1] is not None for q in quotes)
    return counts


def assert_exactly_once(quotes: list[RawQuote], expected: set[tuple[int, datetime]]) -> None:
    counts = key_counts(quotes)
    duplicates = {k: n for k, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} entries published more than once"
    missing = expected - set(counts)
    assert not missing, f"{len(missing)} recorded entries never published, e.g. {min(missing)}"
    assert set(counts) == expected
    assert len(quotes) == len(expected)


@pytest.fixture(scope="session")
def recording() -> Path:
    return CommonSettings().tokvel_replay_data


# A database of this suite's own, never flushed (see `redis_url`); 9, 11 and 12 are flushed
# around every test by the shared, writer and ws fixtures.
INGESTOR_TEST_REDIS_DB = 13


def own_keys_pattern(topic_prefix: str) -> str:
    """Every Redis key the ingestor or backfill writes names its topic, hence the test's prefix."""
    return f"*{{{topic_prefix}*"


@pytest.fixture
async def redis_url(settings: CommonSettings, topic_prefix: str) -> AsyncIterator[str]:
    """Overrides the shared fixture for these tests.

    The shared one flushes one fixed database around every test, which wipes the leases,
    ledgers and checkpoints of the ingestors under test whenever another test session runs at
    the same time. The keys written here all carry the test's unique topic prefix, so nothing
    needs flushing: the test's own keys are deleted when it ends.
    """
    base = settings.redis_url.get_secret_value()
    url = urlunsplit(urlsplit(base)._replace(path=f"/{INGESTOR_TEST_REDIS_DB}"))
    yield url
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=own_keys_pattern(topic_prefix))]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
