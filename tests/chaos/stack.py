"""The stack under chaos: ``tokvel up`` on the private infra, with probes into every part of it.

One run has a database, a topic prefix (``chaos-<stamp>.``) and a supervisor run dir
(``<run dir>/chaos-<stamp>``, the services' logs, kept until the next run) of its own; Redis
database 0 of the private Redis is flushed at the start. The services reach PostgreSQL and
Redis through two :class:`TcpProxy` of this process, so that a network fault can be put
between them and the stores; Kafka is reached directly (a proxy could only carry the bootstrap
connection: brokers advertise their own address), and is broken by restarts instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from redis.asyncio import Redis

from tests.chaos.load import ApiLoad, Call, paths_for
from tests.integration.velocity.replay import delete_topics
from tests.support.kafka import tokvel_topics
from tests.support.recorded import recorded_rows
from tests.support.stack import ReplaySource, StackPorts, SupervisedStack, stack_environment
from tests.support.tcp_proxy import TcpProxy
from tokvel_common import localstack
from tokvel_common.db.migrate import apply_migrations
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.pg_cluster import cluster_of
from tokvel_common.topics import prefixed

T = TypeVar("T")

WRITER_GROUP = "tokvel-writer"
KEY_TIER = "enterprise"  # 6 000 calls a minute: the load stays far below
LOAD_TOKENS = 8  # the top tokens of the first snapshot, asked for by the load
FIRST_DATA_SECONDS = 300.0
PROBE_TIMEOUT_SECONDS = 5.0
POLL_SECONDS = 0.5

Offsets = dict[TopicPartition, int]


class ChaosError(Exception):
    """The stack did not do within a deadline what the suite waits for."""


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, what: str, within: float, interval: float = 0.5
) -> T:
    """The first non-None result of ``probe``; ChaosError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise ChaosError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(interval)


@dataclass(frozen=True)
class ChaosPorts:
    """The services' ports and the two proxies', from ``base`` up."""

    base: int

    @property
    def gateway(self) -> int:
        return self.base

    @property
    def writer_ops(self) -> int:
        return self.base + 3

    @property
    def postgres_proxy(self) -> int:
        return self.base + 10

    @property
    def redis_proxy(self) -> int:
        return self.base + 11

    def stack_ports(self) -> StackPorts:
        return StackPorts(
            gateway=self.base,
            ws=self.base + 1,
            replay=localstack.CMC_REPLAY_PORT,
            ingestor_ops=self.base + 2,
            writer_ops=self.writer_ops,
            velocity_ops=self.base + 4,
        )


@dataclass(frozen=True)
class Replayed:
    """What the replay server serves: how much of which recording, how fast."""

    recording: Path
    snapshots: int
    poll_seconds: float


@dataclass
class Chaos:
    """A running stack and everything a fault or a check needs to reach."""

    layout: Layout
    ports: ChaosPorts
    replayed: Replayed
    stamp: str
    stack: SupervisedStack
    key: str  # an API key of the enterprise tier
    postgres_proxy: TcpProxy
    redis_proxy: TcpProxy
    http: aiohttp.ClientSession
    load: ApiLoad
    kills: dict[str, list[float | None]] = field(default_factory=dict)  # seconds to healthy
    gateway_kills: list[tuple[float, float]] = field(default_factory=list)  # (killed, back)

    # ------------------------------------------------------------------------ coordinates

    @property
    def prefix(self) -> str:
        return self.stack.env["TOPIC_PREFIX"]

    @property
    def bootstrap(self) -> str:
        return self.stack.env["KAFKA_BOOTSTRAP_SERVERS"]

    @property
    def database_dsn(self) -> str:
        """The run's database, directly (the services go through the proxy)."""
        return cluster_of(self.layout).primary().dsn(database_name(self.stamp))

    def topic(self, name: str) -> str:
        return prefixed(self.prefix, name)

    @property
    def writer_group(self) -> str:
        return prefixed(self.prefix, WRITER_GROUP)

    def api_calls(self, start: float, end: float) -> tuple[list[Call], int]:
        """The load's calls under way during ``[start, end]``, but for those that met a killed
        gateway (a kill is not the fault being measured); and how many those were."""
        calls = self.load.between(start, end)
        kept = [
            call
            for call in calls
            if not any(
                call.started <= back and call.started + call.seconds >= killed
                for killed, back in self.gateway_kills
            )
        ]
        return kept, len(calls) - len(kept)

    # ----------------------------------------------------------------------------- probes

    async def get_json(self, url: str) -> tuple[int, Any] | None:
        try:
            async with self.http.get(
                url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)
            ) as response:
                return response.status, orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return None

    async def replay_state(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{localstack.CMC_REPLAY_PORT}/_replay/state"
        answer = await self.get_json(url)
        return answer[1] if answer is not None and answer[0] == 200 else {}

    def service(self, name: str) -> dict[str, Any]:
        found = self.stack.services().get(name)
        if not isinstance(found, dict):
            raise ChaosError(f"the supervisor knows no service {name!r}")
        return found

    async def healthy(self, name: str) -> bool:
        url = self.service(name)["health_url"]
        if url is None:
            return True
        try:
            async with self.http.get(
                url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def metric_samples(self, port: int) -> list[Sample] | None:
        """Every Prometheus sample of the service on ``port``; None when it does not answer."""
        try:
            async with self.http.get(
                f"http://127.0.0.1:{port}/metrics",
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS),
            ) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        return [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    async def metric_sum(self, port: int, name: str) -> float | None:
        """The sum of every sample of a Prometheus metric of the service on ``port``."""
        samples = await self.metric_samples(port)
        if samples is None:
            return None
        return sum(sample.value for sample in samples if sample.name == name)

    async def stored_rows(self) -> int | None:
        """Rows of token_metrics, or None while PostgreSQL does not answer."""
        try:
            conn = await asyncpg.connect(self.database_dsn, timeout=PROBE_TIMEOUT_SECONDS)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        try:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM token_metrics", timeout=PROBE_TIMEOUT_SECONDS * 4
            )
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        finally:
            await conn.close(timeout=PROBE_TIMEOUT_SECONDS)
        return count

    async def end_offsets(self, name: str) -> Offsets:
        """The end offset of every partition of a topic of the run."""
        consumer = AIOKafkaConsumer(
            self.topic(name), bootstrap_servers=self.bootstrap, group_id=None
        )
        await consumer.start()
        try:
            # Subscribed without a group: every partition is assigned once started.
            ends: Offsets = await consumer.end_offsets(list(consumer.assignment()))
            return ends
        finally:
            await consumer.stop()

    async def writer_committed(self) -> Offsets:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            found = await admin.list_consumer_group_offsets(self.writer_group)
        finally:
            await admin.close()
        return {tp: meta.offset for tp, meta in found.items() if meta.offset >= 0}

    async def writer_behind(self, ends: Offsets) -> int:
        """Messages below ``ends`` of token.metrics the writer has not committed yet."""
        try:
            committed = await self.writer_committed()
        except (KafkaError, OSError) as exc:  # Kafka itself may be what is broken
            log(f"  (writer offsets unknown: {exc!r})")
            return sum(ends.values())
        return sum(max(0, end - committed.get(tp, 0)) for tp, end in ends.items())

    async def rows_growing(self, *, within: float) -> float | None:
        """Seconds until token_metrics has more rows than now; None if it did not grow."""
        started = time.monotonic()
        first = await eventually(self.stored_rows, what="PostgreSQL answering", within=within)

        async def grown() -> int | None:
            rows = await self.stored_rows()
            return rows if rows is not None and rows > first else None

        try:
            await eventually(grown, what="new rows", within=within)
        except ChaosError:
            return None
        return time.monotonic() - started


def database_name(stamp: str) -> str:
    return f"tokvel_chaos_{stamp}"


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"{stamp} {message}", flush=True)


def load_tokens(recording: Path) -> list[int]:
    """The best-ranked tokens of the recording's first snapshot."""
    first: list[dict[str, Any]] = []
    for row in recorded_rows(recording, "", "~"):
        if first and row["ts"] != first[0]["ts"]:
            break
        first.append(row)
    ranked = sorted(first, key=lambda row: row["cmc_rank"])
    return [row["cmc_id"] for row in ranked[:LOAD_TOKENS]]


async def _create_database(layout: Layout, name: str) -> None:
    primary = cluster_of(layout).primary()
    admin = await asyncpg.connect(primary.dsn("postgres"), timeout=30)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(primary.dsn(name), timeout=30)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()


async def drop_database(layout: Layout, name: str) -> None:
    admin = await asyncpg.connect(cluster_of(layout).primary().dsn("postgres"), timeout=30)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _proxied(dsn: str, port: int) -> str:
    """``dsn`` with its host and port replaced by the proxy's."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}"))


@contextlib.asynccontextmanager
async def running_stack(
    layout: Layout, ports: ChaosPorts, replayed: Replayed, extra_env: Mapping[str, str]
) -> AsyncIterator[Chaos]:
    """The whole stack on the private infra, up and serving data, with the load running.

    On the way out the services are stopped; the run's database and topics are removed only
    when the block succeeded (kept for a look otherwise).
    """
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    prefix = f"chaos-{stamp}."
    for earlier in layout.run_dir.glob("chaos-*"):  # the logs of earlier runs: only the last kept
        shutil.rmtree(earlier)
    bootstrap = f"127.0.0.1:{localstack.KAFKA_PORT}"
    log(f"run {stamp}: database {database_name(stamp)}, topics {prefix}*, ports {ports.base}+")
    await _create_database(layout, database_name(stamp))
    redis = Redis.from_url(localstack.REDIS_URL)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()
    postgres_proxy = TcpProxy("127.0.0.1", localstack.POSTGRES_PORT, ports.postgres_proxy)
    redis_proxy = TcpProxy("127.0.0.1", localstack.REDIS_PORT, ports.redis_proxy)
    await postgres_proxy.start()
    await redis_proxy.start()
    direct_dsn = cluster_of(layout).primary().dsn(database_name(stamp))
    run_dir = layout.run_dir / f"chaos-{stamp}"
    env = stack_environment(
        run_dir=run_dir,
        ports=ports.stack_ports(),
        replay=ReplaySource(replayed.recording, replayed.snapshots, replayed.poll_seconds),
        kafka_bootstrap_servers=bootstrap,
        database_url=_proxied(direct_dsn, ports.postgres_proxy),
        redis_url=f"redis://127.0.0.1:{ports.redis_proxy}/0",
        topic_prefix=prefix,
    )
    env.update(extra_env)
    stack = SupervisedStack(run_dir, ports.stack_ports(), env)
    busy = stack.ports.listening()
    if busy:
        raise ChaosError(f"ports {busy} are taken: is another chaos run going on?")
    succeeded = False
    http = aiohttp.ClientSession()
    try:
        async with tokvel_topics(bootstrap, prefix):
            key = await asyncio.to_thread(stack.create_key, "chaos", KEY_TIER)
            log(f"tokvel up (logs in {run_dir}/services)")
            await asyncio.to_thread(stack.up)
            load = ApiLoad(
                f"http://127.0.0.1:{ports.gateway}", key, paths_for(load_tokens(replayed.recording))
            )
            chaos = Chaos(
                layout, ports, replayed, stamp, stack, key, postgres_proxy, redis_proxy, http, load
            )
            await _wait_first_data(chaos)
            await load.start()
            try:
                yield chaos
            finally:
                await load.stop()
                log("tokvel down")
                stopped = await asyncio.to_thread(stack.down)
                if stopped.returncode != 0:
                    log(stopped.describe())
            await delete_topics(bootstrap, prefix)  # the velocity worker's own topics
            succeeded = True
    finally:
        await http.close()
        await postgres_proxy.cut()
        await redis_proxy.cut()
        if succeeded:
            await drop_database(layout, database_name(stamp))
        else:
            for pid, _ in stack.leftover_processes():
                os.kill(pid, signal.SIGKILL)
            log(f"kept for a look: database {database_name(stamp)}, topics {prefix}*, {run_dir}")


async def _wait_first_data(chaos: Chaos) -> None:
    """Until the gateway answers 200 to everything the load asks for (a token is known, from
    its metadata, before its first sample is stored: its velocity is 404 until then)."""
    headers = {"X-API-Key": chaos.key}

    async def served() -> bool | None:
        for path in chaos.load.paths:
            try:
                async with chaos.http.get(
                    f"http://127.0.0.1:{chaos.ports.gateway}{path}",
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS),
                ) as response:
                    if response.status != 200:
                        return None
            except (aiohttp.ClientError, TimeoutError):
                return None
        return True

    await eventually(served, what="the first data served by the gateway", within=FIRST_DATA_SECONDS)
    log(f"data served; replay at {(await chaos.replay_state()).get('snapshot_index')}")
