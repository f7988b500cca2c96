"""What both drills share: a fresh pipeline on the stack, probes, Kafka vs PostgreSQL accounting.

Each run gets its own topic prefix and database (``drill-<name>-<stamp>.``,
``tokvel_drill_<stamp>``), so the recorded data replayed by the pipeline is new to the velocity
worker and to the table every time, on a fresh stack or an old one. The services run under the
supervisor of the stack's run dir on ports ``TOKVEL_DRILL_PORT_BASE`` (18900) and up.

What "acknowledged" means for the pipeline: the writer commits its Kafka offsets only after the
batch's PostgreSQL transaction committed, so every ``token.metrics`` message below the writer
group's committed offset is a write PostgreSQL acknowledged. Comparing those messages with the
table's rows is how the drills count rows lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tokvel_common import localstack
from tokvel_common.commands.stack_cmd import (
    create_demo_key,
    demo_environment,
    http_get,
    start_stack,
    stop_stack,
)
from tokvel_common.db.migrate import apply_migrations
from tokvel_common.events import MetricsSample
from tokvel_common.infra import stack
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.pg_cluster import BACKUPS_ENV, STANDBY_ENV, PgCluster, cluster_of
from tokvel_common.infra.process import InfraError, live_pid, say
from tokvel_common.serialization import decode
from tokvel_common.supervisor import SUPERVISOR_PID_FILE, StackSettings, supervisor_markers
from tokvel_common.topics import METRICS, TOKEN_INFO, TOPICS, prefixed

PORT_BASE_ENV = "TOKVEL_DRILL_PORT_BASE"
WRITER_GROUP = "tokvel-writer"
# The services the drills need; the broadcaster adds nothing to a database drill.
SERVICES = ["cmc-replay", "ingestor", "velocity", "writer", "gateway"]

Sample = tuple[int, datetime]  # (cmc_id, event time): a token_metrics row's identity
Offsets = dict[TopicPartition, int]
T = TypeVar("T")


@dataclass(frozen=True)
class Figure:
    name: str
    value: str
    target: str
    met: bool


@dataclass(frozen=True)
class DrillPorts:
    base: int

    @property
    def gateway(self) -> int:
        return self.base

    @property
    def replay(self) -> int:
        return self.base + 5

    @property
    def replay_writer(self) -> int:
        return self.base + 6

    def environment(self) -> dict[str, str]:
        return {
            "PORT": str(self.base),
            "WS_PORT": str(self.base + 1),
            "INGESTOR_OPS_PORT": str(self.base + 2),
            "WRITER_OPS_PORT": str(self.base + 3),
            "VELOCITY_OPS_PORT": str(self.base + 4),
            "REPLAY_PORT": str(self.replay),
        }


@dataclass
class Drill:
    name: str
    layout: Layout
    stamp: str
    ports: DrillPorts
    key: str = ""

    @property
    def cluster(self) -> PgCluster:
        return cluster_of(self.layout)

    @property
    def prefix(self) -> str:
        return f"drill-{self.name}-{self.stamp}."

    @property
    def database(self) -> str:
        return f"tokvel_drill_{self.stamp}"

    @property
    def database_url(self) -> str:
        return self.cluster.database_url(self.database)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{localstack.KAFKA_PORT}"

    @property
    def metrics_topic(self) -> str:
        return prefixed(self.prefix, METRICS)

    @property
    def topics(self) -> list[str]:
        return [self.metrics_topic, prefixed(self.prefix, TOKEN_INFO)]

    @property
    def writer_group(self) -> str:
        return prefixed(self.prefix, WRITER_GROUP)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    def service_environment(self) -> dict[str, str]:
        env = {
            **self.ports.environment(),
            "DATABASE_URL": self.database_url,
            "TOPIC_PREFIX": self.prefix,
            "TOKVEL_STACK_SERVICES": orjson.dumps(SERVICES).decode(),
            "CMC_BASE_URL": f"http://127.0.0.1:{self.ports.replay}",
        }
        settings = StackSettings(port=self.ports.gateway, replay_port=self.ports.replay)
        return {**env, **demo_environment(settings)}


def now() -> datetime:
    return datetime.now(UTC)


def open_drill(name: str, options: dict[str, str]) -> Drill:
    """Bring the stack up with ``options`` (TOKVEL_PG_* variables), a new database and pipeline."""
    os.environ.update(options)
    layout = Layout.from_environment()
    if _supervised(layout):
        raise InfraError(
            f"a stack is already running in {layout.run_dir} (tokvel status): stop it with "
            "`tokvel down` first; the drill runs its own services there"
        )
    drill = Drill(
        name,
        layout,
        now().strftime("%Y%m%d%H%M%S"),
        DrillPorts(int(os.environ.get(PORT_BASE_ENV) or 18900)),
    )
    say(f"== {name} drill {drill.stamp}: infrastructure (run dir {layout.run_dir})")
    stack.up(layout)
    # Pinned: the drills delete data dirs, which must not change what the stack is.
    cluster = drill.cluster
    os.environ[BACKUPS_ENV] = "1" if cluster.backups else "0"
    os.environ[STANDBY_ENV] = "1" if cluster.standby else "0"
    asyncio.run(_create_database(drill))
    # Before any service starts: a consumer of a topic that does not exist yet never reads it.
    asyncio.run(_create_topics(drill))
    os.environ.update(drill.service_environment())
    drill.key = create_demo_key()
    say(f"== services on ports {drill.ports.base}-{drill.ports.replay}, topics {drill.prefix}*")
    start_stack(layout, StackSettings())
    return drill


def _supervised(layout: Layout) -> bool:
    pid_path = layout.run_dir / SUPERVISOR_PID_FILE
    return live_pid(pid_path, supervisor_markers(layout.run_dir)) is not None


async def _create_database(drill: Drill) -> None:
    # On the primary itself: a standby may not have replayed the CREATE DATABASE yet.
    primary = drill.cluster.primary()
    admin = await asyncpg.connect(primary.dsn(), timeout=30)
    try:
        await admin.execute(f'CREATE DATABASE "{drill.database}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(primary.dsn(drill.database), timeout=30)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()

    async def reachable() -> bool:
        return await rows_and_newest(drill.database_url) is not None

    await eventually(reachable, what=f"{drill.database} on every node", within=60, interval=0.2)


async def _create_topics(drill: Drill) -> None:
    names = [prefixed(drill.prefix, spec.name) for spec in TOPICS]
    admin = AIOKafkaAdminClient(bootstrap_servers=drill.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, spec.partitions, replication_factor=1, topic_configs=spec.config)
                for name, spec in zip(names, TOPICS, strict=True)
            ]
        )

        async def leaders() -> bool:
            described = await admin.describe_topics(names)
            return all(
                t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            )

        await eventually(leaders, what="the drill's topics", within=60, interval=0.2)
    finally:
        await admin.close()


def close_drill(drill: Drill, *, succeeded: bool) -> None:
    """Stop the drill's services; drop its database and topics unless it failed."""
    say("== stopping the drill's services")
    try:
        stop_stack(drill.layout, StackSettings())
    except InfraError as exc:  # reported, and the drill's own outcome still decides the exit
        say(f"   could not stop every service: {exc}")
    if succeeded:
        asyncio.run(_drop(drill))
    else:
        say(f"kept for inspection: database {drill.database}, topics {drill.prefix}*")


async def _drop(drill: Drill) -> None:
    admin = await asyncpg.connect(drill.cluster.primary().dsn(), timeout=30)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{drill.database}" WITH (FORCE)')
    finally:
        await admin.close()
    client = AIOKafkaAdminClient(bootstrap_servers=drill.bootstrap)
    await client.start()
    try:
        existing = set(await client.list_topics())
        doomed = [t for t in existing if t.startswith(drill.prefix)]
        if doomed:
            await client.delete_topics(doomed)
    finally:
        await client.close()


# ---------------------------------------------------------------------------------- probes


def api_serves_from_postgres(drill: Drill, cmc_id: int) -> bool:
    """A history request: the gateway answers it from PostgreSQL only (never from Redis)."""
    answer = http_get(
        f"{drill.gateway}/v1/tokens/{cmc_id}/history?interval=raw&limit=1",
        {"X-API-Key": drill.key},
    )
    return answer is not None and answer[0] == 200


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, what: str, within: float, interval: float = 0.5
) -> T:
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise InfraError(f"{what}: not after {within:.0f}s")
        await asyncio.sleep(interval)


async def rows_and_newest(
    dsn: str, before: datetime | None = None
) -> tuple[int, datetime | None, int | None] | None:
    """token_metrics rows, the newest write (created_at) and one token id; None: no answer.

    With ``before``, only the rows written before that moment count.
    """
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, max(created_at) AS newest,"
            " (SELECT min(cmc_id) FROM tokens) AS cmc_id FROM token_metrics"
            " WHERE created_at < coalesce($1, 'infinity'::timestamptz)",
            before,
            timeout=10,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    finally:
        await conn.close(timeout=5)
    assert row is not None
    return int(row["n"]), row["newest"], row["cmc_id"]


async def stored_samples(dsn: str) -> set[Sample]:
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        rows = await conn.fetch(
            'SELECT t.cmc_id, m."timestamp" FROM token_metrics m JOIN tokens t ON t.id = m.token_id'
        )
    finally:
        await conn.close()
    return {(int(r["cmc_id"]), r["timestamp"]) for r in rows}


# ------------------------------------------------------------------------------------ Kafka


async def committed_offsets(bootstrap: str, group: str, topics: list[str]) -> Offsets:
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        found = await client.list_consumer_group_offsets(group)
    finally:
        await client.close()
    return {
        tp: meta.offset for tp, meta in found.items() if tp.topic in topics and meta.offset >= 0
    }


@contextlib.asynccontextmanager
async def _reader(bootstrap: str) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        # aiokafka's stop() awaits a task it cancels; cancelled before it ever ran (nothing was
        # fetched), that await raises CancelledError. One turn of the loop lets it start.
        await asyncio.sleep(0)
        await consumer.stop()


async def partitions_of(bootstrap: str, topics: list[str]) -> list[TopicPartition]:
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        described = await client.describe_topics(topics)
    finally:
        await client.close()
    return [
        TopicPartition(t["topic"], p["partition"])
        for t in described
        for p in sorted(t["partitions"], key=lambda p: int(p["partition"]))
    ]


async def offsets_at(bootstrap: str, topics: list[str], at: datetime) -> Offsets:
    """Per partition, the first offset whose record time is at or after ``at`` (else the end)."""
    partitions = await partitions_of(bootstrap, topics)
    async with _reader(bootstrap) as consumer:
        stamp = int(at.timestamp() * 1000)
        found = await consumer.offsets_for_times({tp: stamp for tp in partitions})
        ends = await consumer.end_offsets(partitions)
    return {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in partitions}


async def read_samples(
    bootstrap: str, start: Offsets, end: Offsets, *, within: float = 300.0
) -> set[Sample]:
    """The identities of the ``token.metrics`` messages in ``[start, end)`` of each partition."""
    wanted = {tp: (start.get(tp, 0), stop) for tp, stop in end.items() if stop > start.get(tp, 0)}
    found: set[Sample] = set()
    if not wanted:
        return found
    deadline = time.monotonic() + within
    async with _reader(bootstrap) as consumer:
        consumer.assign(list(wanted))
        for tp, (first, _) in wanted.items():
            consumer.seek(tp, first)
        remaining = set(wanted)
        while remaining:
            if time.monotonic() > deadline:
                raise InfraError(f"reading {sorted(map(str, remaining))}: not done in {within}s")
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for tp, records in batches.items():
                stop = wanted[tp][1]
                for record in records:
                    if record.offset < stop and record.value is not None:
                        sample = decode(record.value, MetricsSample)
                        found.add((sample.cmc_id, sample.ts))
            # Positions, not the last offsets seen: transaction markers take offsets too.
            for tp in list(remaining):
                if await consumer.position(tp) >= wanted[tp][1]:
                    remaining.discard(tp)
                    consumer.pause(tp)
    return found


async def seed_group(bootstrap: str, group: str, offsets: Offsets) -> None:
    """Give a new, empty consumer group its starting offsets."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: offset for tp, offset in offsets.items()})
    finally:
        await consumer.stop()


def start_replay_writer(drill: Drill, group: str, log_path: Path) -> subprocess.Popen[bytes]:
    """A second writer in its own consumer group: it re-reads what the restore lacks."""
    env = {
        **os.environ,
        "WRITER_GROUP_ID": group.removeprefix(drill.prefix),
        "WRITER_OPS_PORT": str(drill.ports.replay_writer),
    }
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tokvel_common.cli", "run", "writer"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# ---------------------------------------------------------------------------------- report


def report(title: str, figures: list[Figure], json_path: str | None) -> int:
    width = max(len(f.name) for f in figures)
    value_width = max(len(f.value) for f in figures)
    say("")
    say(f"{title} — {now().isoformat(timespec='seconds')}, load {os.getloadavg()[0]:.2f}")
    for figure in figures:
        mark = "ok" if figure.met else "MISSED"
        value = f"{figure.value:>{value_width}}"
        say(f"  {figure.name:<{width}}  {value}  target {figure.target}  {mark}")
    if json_path:
        Path(json_path).write_bytes(
            orjson.dumps(
                {"drill": title, "figures": [f.__dict__ for f in figures]},
                option=orjson.OPT_INDENT_2,
            )
        )
    return 0 if all(f.met for f in figures) else 1
