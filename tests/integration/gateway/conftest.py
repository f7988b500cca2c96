"""Fixtures of the gateway's integration tests: real data in PostgreSQL, the app served over HTTP.

The recorded data is loaded once per session into a database of its own (``loaded_data`` in
tests/conftest.py); each test module gets a clone of it (``db_url``: read-only tests share it),
and tests that change data ask for ``fresh_db_url``.
The app is served for real on a loopback port (aiohttp's TestServer) and hit with a client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from api_gateway.app import create_app
from api_gateway.settings import GatewaySettings
from tokvel_common.apikeys import INSERT_KEY, display_prefix, generate_key, hash_key

PEPPER = SecretStr("integration-test-pepper")


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
