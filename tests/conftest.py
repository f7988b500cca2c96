"""Session fixtures over the real local stack, with isolation per test.

The stack is the one ``make infra-up`` runs (or whatever KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL
and REDIS_URL point at). With ``TOKVEL_TESTCONTAINERS=1`` and a reachable Docker engine, the
three services are started with testcontainers instead.

Isolation: each test gets its own Kafka topics (a unique prefix, via the ``topic_prefix``
setting), its own PostgreSQL database (cloned from a migrated template) and a flushed Redis
database of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from tests.integration.gateway.dataset import Dataset, load
from tests.support.databases import create_database, drop_database, with_database
from tests.support.kafka import tokvel_topics
from tokvel_common.db.migrate import apply_migrations
from tokvel_common.settings import CommonSettings

TEMPLATE_DB_PREFIX = "tokvel_test_template_"
TEST_DB_PREFIX = "tokvel_test_"
TEST_REDIS_DB = 9


def _testcontainers_env() -> Iterator[dict[str, str]]:
    """Start Kafka, PostgreSQL and Redis containers; yields their connection settings."""
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    with (
        KafkaContainer().with_kraft() as kafka,
        PostgresContainer("postgres:15", driver=None) as postgres,
        RedisContainer("redis:7") as redis,
    ):
        yield {
            "KAFKA_BOOTSTRAP_SERVERS": kafka.get_bootstrap_server(),
            "DATABASE_URL": postgres.get_connection_url(),
            "REDIS_URL": f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0",
        }


@pytest.fixture(scope="session")
def stack_env() -> Iterator[dict[str, str]]:
    if os.environ.get("TOKVEL_TESTCONTAINERS") == "1":
        yield from _testcontainers_env()
    else:
        yield {}


@pytest.fixture(scope="session")
def settings(stack_env: dict[str, str]) -> CommonSettings:
    overrides: dict[str, object] = {k.lower(): v for k, v in stack_env.items()}
    return CommonSettings.model_validate(overrides)


@pytest.fixture(scope="session")
async def template_database(settings: CommonSettings) -> AsyncIterator[str]:
    """A database with every migration applied, cloned by each test that needs PostgreSQL.

    Named per session, so two pytest sessions on one machine never collide.
    """
    admin_dsn = settings.database_url.get_secret_value()
    name = await create_database(admin_dsn, prefix=TEMPLATE_DB_PREFIX)
    template = await asyncpg.connect(with_database(admin_dsn, name))
    try:
        await apply_migrations(template)
    finally:
        await template.close()
    yield name
    await drop_database(admin_dsn, name)


@pytest.fixture
async def database_url(settings: CommonSettings, template_database: str) -> AsyncIterator[str]:
    admin_dsn = settings.database_url.get_secret_value()
    name = await create_database(admin_dsn, prefix=TEST_DB_PREFIX, template=template_database)
    yield with_database(admin_dsn, name)
    await drop_database(admin_dsn, name)


@pytest.fixture
async def empty_database_url(settings: CommonSettings) -> AsyncIterator[str]:
    """A database with nothing in it (for migration tests)."""
    admin_dsn = settings.database_url.get_secret_value()
    name = await create_database(admin_dsn, prefix=TEST_DB_PREFIX)
    yield with_database(admin_dsn, name)
    await drop_database(admin_dsn, name)


@pytest.fixture
async def topic_prefix(settings: CommonSettings) -> AsyncIterator[str]:
    """A unique topic prefix with the tokvel topics created under it."""
    prefix = f"test-{uuid.uuid4().hex[:10]}."
    async with tokvel_topics(settings.kafka_bootstrap_servers, prefix):
        yield prefix


@pytest.fixture
def test_settings(
    settings: CommonSettings, topic_prefix: str, database_url: str, redis_url: str
) -> CommonSettings:
    """Settings for one test: its own topics, database and Redis database."""
    return settings.model_copy(
        update={
            "topic_prefix": topic_prefix,
            "database_url": SecretStr(database_url),
            "redis_url": SecretStr(redis_url),
        }
    )


@pytest.fixture
async def redis_url(settings: CommonSettings) -> AsyncIterator[str]:
    """A Redis database of its own, empty at the start and flushed at the end."""
    base = settings.redis_url.get_secret_value()
    url = urlunsplit(urlsplit(base)._replace(path=f"/{TEST_REDIS_DB}"))
    client = Redis.from_url(url)
    try:
        await client.flushdb()
        yield url
        await client.flushdb()
    finally:
        await client.aclose()


# The recorded data, loaded once per session (gateway, e2e and abuse tests share it).


@dataclass(frozen=True)
class LoadedData:
    template: str
    dataset: Dataset


@pytest.fixture(scope="session")
async def loaded_data(settings: CommonSettings) -> AsyncIterator[LoadedData]:
    """A migrated database holding the recorded data: the template of every gateway test DB.

    Its own uniquely named database (not the shared migrated template), so that concurrent
    test sessions on one machine never clone from, or drop, each other's template.
    """
    admin_dsn = settings.database_url.get_secret_value()
    name = await create_database(admin_dsn, prefix="tokvel_test_gw_")
    conn = await asyncpg.connect(with_database(admin_dsn, name))
    try:
        await apply_migrations(conn)
        dataset = await load(conn)
    finally:
        await conn.close()
    yield LoadedData(name, dataset)
    await drop_database(admin_dsn, name)


@pytest.fixture(scope="session")
def dataset(loaded_data: LoadedData) -> Dataset:
    return loaded_data.dataset


@pytest.fixture(scope="module")
async def db_url(settings: CommonSettings, loaded_data: LoadedData) -> AsyncIterator[str]:
    """The data, shared by the tests of one module (they must not change it)."""
    admin_dsn = settings.database_url.get_secret_value()
    name = await create_database(admin_dsn, prefix=TEST_DB_PREFIX, template=loaded_data.template)
    yield with_database(admin_dsn, name)
    await drop_database(admin_dsn, name)


@pytest.fixture
async def fresh_db_url(settings: CommonSettings, loaded_data: LoadedData) -> AsyncIterator[str]:
    """The data, for one test that changes it."""
    admin_dsn = settings.database_url.get_secret_value()
    name = await create_database(admin_dsn, prefix=TEST_DB_PREFIX, template=loaded_data.template)
    yield with_database(admin_dsn, name)
    await drop_database(admin_dsn, name)
