"""Fixtures of the writer's integration tests: real samples, a private Redis, a Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.support.recorded import recorded_samples
from tests.support.writer import free_port
from tokvel_common.events import MetricsSample
from tokvel_common.infra import redis_cluster
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.process import live_pid
from tokvel_common.settings import CommonSettings

# Sessions testing other services run against the same local Redis and flush database 9 (the
# root fixture's) at every test; the writer's tests watch whole-database events (a flush means
# "warm again"), so they keep a database of their own.
WRITER_REDIS_DB = 11

# Four hours of the recorded 5-minute week, across midnight: 48 snapshots, ~9,300 samples.
SLICE = ("2017-08-10T22:00:00Z", "2017-08-11T02:00:00Z")


@pytest.fixture(scope="session")
def replay_slice(settings: CommonSettings) -> list[MetricsSample]:
    """Real recorded samples (TOKVEL_REPLAY_DATA, read in place), in recording order."""
    return recorded_samples(settings.tokvel_replay_data, *SLICE)


@pytest.fixture
async def redis_url(settings: CommonSettings) -> AsyncIterator[str]:
    """Overrides the root fixture (and so ``test_settings``) for the writer's tests."""
    url = urlunsplit(urlsplit(settings.redis_url.get_secret_value())._replace(
        path=f"/{WRITER_REDIS_DB}"
    ))  # fmt: skip
    client = Redis.from_url(url)
    try:
        await client.flushdb()
        yield url
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """The project's local 3-master cluster; stopped at the end if this session started it."""
    layout = Layout.from_environment()
    layout.ensure_run_dir()
    already_running = all(
        live_pid(paths.pid, paths.markers) is not None
        for paths in (redis_cluster.locate(layout, port) for port in redis_cluster.PORTS)
    )
    url = redis_cluster.up(layout)
    yield url
    if not already_running:
        redis_cluster.down(layout)


@pytest.fixture
async def cluster_url(redis_cluster_url: str) -> AsyncIterator[str]:
    """The cluster, emptied before and after the test (it is private to the tests)."""
    client = RedisCluster.from_url(redis_cluster_url)
    try:
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
        yield redis_cluster_url
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    finally:
        await client.aclose()


@dataclass
class PrivateRedis:
    """A standalone redis-server of one test, which it may stop and start at will."""

    paths: redis_cluster.NodePaths

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.paths.port}/0"

    def start(self) -> None:
        pid = redis_cluster.start_node(self.paths, cluster=False)
        redis_cluster.wait_node(self.paths, pid)

    def stop(self) -> None:
        redis_cluster.stop_node(self.paths)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    home = tmp_path / "redis"
    server = PrivateRedis(
        redis_cluster.NodePaths(free_port(), home, home / "redis.pid", home / "redis.log")
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()
