"""Redis slow or killed mid-test: answers keep coming from PostgreSQL, limits stay in force.

Uses a private redis-server on a port of its own (never the shared one), stopped and killed
under a running gateway.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tests.integration.gateway.conftest import Api, create_key, gateway_settings, serve
from tests.integration.gateway.helpers import free_port, minute_with_room

pytestmark = pytest.mark.integration

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
TIERS = {
    "basic": {"per_minute": 60, "per_month": 1000},
    "small": {"per_minute": 5, "per_month": 1000},
}


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url)
        try:
            for _ in range(100):
                try:
                    if await client.ping():
                        return
                except OSError:
                    await asyncio.sleep(0.05)
                except Exception:
                    await asyncio.sleep(0.05)
            raise AssertionError("private redis-server did not start")
        finally:
            await client.aclose()

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis()
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


async def timed(
    api: Api, path: str, key: str | None = None
) -> tuple[int, float, dict[str, object], dict[str, str]]:
    started = time.monotonic()
    response = await api.get(path, key=key)
    elapsed = time.monotonic() - started
    return response.status, elapsed, await response.json(), dict(response.headers)


async def test_redis_slow_then_killed_answers_from_postgres(
    db_url: str, private_redis: PrivateRedis
) -> None:
    key = await create_key(db_url, "enterprise")
    settings = gateway_settings(db_url, private_redis.url, redis_timeout_seconds=0.25)
    async with serve(settings, key) as api:
        assert (await api.json("/v1/tokens/1"))["meta"]["source"] == "database"
        assert (await api.json("/v1/tokens/1"))["meta"]["source"] == "cache"

        private_redis.signal(signal.SIGSTOP)  # hung: every call would wait forever
        for path in ("/v1/tokens/1", "/v1/tokens/1027", "/v1/tokens", "/v1/tokens/1/velocity"):
            status, elapsed, body, headers = await timed(api, path)
            assert status == 200, (path, body)
            assert body["meta"]["source"] == "database"  # type: ignore[index]
            assert elapsed < 2.0, f"{path} took {elapsed:.2f} s"
            assert "X-RateLimit-Remaining" in headers
        usage = await api.json("/v1/usage")
        assert usage["data"]["limiter"] == "local"

        await private_redis.kill()  # and now gone
        for _ in range(5):
            for path in ("/v1/tokens/1", "/v1/tokens/1/history", "/v1/symbols/ETH"):
                status, elapsed, body, _ = await timed(api, path)
                assert status == 200, (path, body)
                assert elapsed < 2.0
        ready = await api.session.get(api.base_url + "/readyz")
        assert ready.status == 200, "PostgreSQL alone is enough to serve"


async def test_without_redis_each_replica_still_limits(
    db_url: str, private_redis: PrivateRedis
) -> None:
    key = await create_key(db_url, "small")
    settings = gateway_settings(db_url, private_redis.url, api_tiers=TIERS)
    async with serve(settings, key) as api:
        await private_redis.kill()
        await minute_with_room()
        statuses = [(await api.get("/v1/tokens/1")).status for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        refused = await api.get("/v1/tokens/1")
        assert refused.headers["X-RateLimit-Limit"] == "5"
        assert "Retry-After" in refused.headers
        usage = (await api.json("/v1/usage"))["data"]
        assert usage["limiter"] == "local" and usage["minute"]["remaining"] == 0

        # Redis comes back: the shared counters are used again.
        await private_redis.start()
        deadline = time.monotonic() + 5
        while (await api.json("/v1/usage"))["data"]["limiter"] != "redis":
            assert time.monotonic() < deadline, "Redis never used again"
            await asyncio.sleep(0.2)
