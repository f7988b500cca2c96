"""Fixtures of the gateway's integration tests: real data in PostgreSQL, the app served over HTTP.

The recorded data is loaded once per session into a database of its own; each test module gets
a clone of it (read-only tests share it), and tests that change data ask for ``fresh_db_url``.
The app is served for real on a loopback port (aiohttp's TestServer) and hit with a client.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from api_gateway.app import create_app
from api_gateway.settings import GatewaySettings
from tests.integration.gateway.dataset import Dataset, load
from tokvel_common.apikeys import INSERT_KEY, display_prefix, generate_key, hash_key
from tokvel_common.db.migrate import apply_migrations
from tokvel_common.settings import CommonSettings

PEPPER = SecretStr("integration-test-pepper")


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def _clone(admin_dsn: str, template: str) -> str:
    name = f"tokvel_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return name


async def _drop(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


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
    name = f"tokvel_test_gw_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(with_database(admin_dsn, name))
    try:
        await apply_migrations(conn)
        dataset = await load(conn)
    finally:
        await conn.close()
    yield LoadedData(name, dataset)
    await _drop(admin_dsn, name)


@pytest.fixture(scope="session")
def dataset(loaded_data: LoadedData) -> Dataset:
    return loaded_data.dataset


@pytest.fixture(scope="module")
async def db_url(settings: CommonSettings, loaded_data: LoadedData) -> AsyncIterator[str]:
    """The data, shared by the tests of one module (they must not change it)."""
    admin_dsn = settings.database_url.get_secret_value()
    name = await _clone(admin_dsn, loaded_data.template)
    yield with_database(admin_dsn, name)
    await _drop(admin_dsn, name)


@pytest.fixture
async def fresh_db_url(settings: CommonSettings, loaded_data: LoadedData) -> AsyncIterator[str]:
    """The data, for one test that changes it."""
    admin_dsn = settings.database_url.get_secret_value()
    name = await _clone(admin_dsn, loaded_data.template)
    yield with_database(admin_dsn, name)
    await _drop(admin_dsn, name)


def gateway_settings(database_url: str, redis_url: str, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "database_url": SecretStr(database_url),
        "redis_url": SecretStr(redis_url),
        "api_key_pepper": PEPPER,
        "quota_flush_interval_seconds": 0.2,
        "access_log": False,
        "port": 0,
    }
    values.update(overrides)
    return GatewaySettings.model_validate(values)


async def create_key(
    database_url: str, tier: str = "basic", name: str = "test", pepper: SecretStr = PEPPER
) -> str:
    key = generate_key()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(INSERT_KEY, hash_key(key, pepper), display_prefix(key), name, tier)
    finally:
        await conn.close()
    return key


@dataclass
class Api:
    """A served gateway and a client for it."""

    base_url: str
    session: aiohttp.ClientSession
    settings: GatewaySettings
    database_url: str
    key: str

    async def get(self, path: str, key: str | None = None, **params: Any) -> aiohttp.ClientResponse:
        """GET with the API key (``key``, else the served one; ``auth=False``: none)."""
        auth = params.pop("auth", True)
        headers = {"X-API-Key": key or self.key} if auth else {}
        response = await self.session.get(
            self.base_url + path, params=params or None, headers=headers
        )
        await response.read()
        return response

    async def json(self, path: str, **params: Any) -> Any:
        response = await self.get(path, **params)
        assert response.status == 200, (response.status, await response.text())
        return await response.json()

    async def new_key(self, tier: str = "basic", name: str = "test") -> str:
        return await create_key(self.database_url, tier, name)


@asynccontextmanager
async def serve(settings: GatewaySettings, key: str = "") -> AsyncIterator[Api]:
    server = TestServer(create_app(settings), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(
                str(server.make_url("")).rstrip("/"),
                session,
                settings,
                settings.database_url.get_secret_value(),
                key,
            )
    finally:
        await server.close()


@pytest.fixture
async def api(db_url: str, redis_url: str) -> AsyncIterator[Api]:
    """The gateway over the shared data, with an enterprise key (limits out of the way)."""
    key = await create_key(db_url, "enterprise")
    async with serve(gateway_settings(db_url, redis_url), key) as served:
        yield served
