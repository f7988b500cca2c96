"""Two real gateway processes (``tokvel run gateway``) share the limits and see key changes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from tests.integration.gateway.conftest import PEPPER, create_key
from tests.integration.gateway.helpers import free_port, minute_with_room
from tests.integration.gateway.test_keys_cmd import TOKVEL
from tokvel_common.settings import CommonSettings

pytestmark = pytest.mark.integration


async def _wait_healthy(
    session: aiohttp.ClientSession, base: str, process: asyncio.subprocess.Process
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.returncode is None, "the gateway exited"
        try:
            async with session.get(base + "/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not start")


@pytest.fixture(scope="module")
async def replicas(db_url: str, settings: CommonSettings) -> AsyncIterator[list[str]]:
    redis = settings.redis_url.get_secret_value()
    redis_url = urlunsplit(urlsplit(redis)._replace(path="/9"))
    processes: list[asyncio.subprocess.Process] = []
    bases: list[str] = []
    async with aiohttp.ClientSession() as session:
        try:
            for _ in range(2):
                port = free_port()
                env = {
                    **os.environ,
                    "HOST": "127.0.0.1",
                    "PORT": str(port),
                    "DATABASE_URL": db_url,
                    "REDIS_URL": redis_url,
                    "API_KEY_PEPPER": PEPPER.get_secret_value(),
                    "QUOTA_FLUSH_INTERVAL_SECONDS": "0.2",
                    "ACCESS_LOG": "false",
                    "LOG_LEVEL": "WARNING",
                }
                process = await asyncio.create_subprocess_exec(
                    str(TOKVEL), "run", "gateway", env=env, stdout=asyncio.subprocess.DEVNULL
                )
                processes.append(process)
                bases.append(f"http://127.0.0.1:{port}")
            for process, base in zip(processes, bases, strict=True):
                await _wait_healthy(session, base, process)
            yield bases
        finally:
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def test_two_replicas_share_the_per_minute_limit(
    replicas: list[str], db_url: str, redis_url: str
) -> None:
    key = await create_key(db_url, "basic")
    headers = {"X-API-Key": key}
    await minute_with_room()
    async with aiohttp.ClientSession(headers=headers) as session:
        for n in range(60):
            async with session.get(replicas[n % 2] + "/v1/tokens/1") as response:
                assert response.status == 200, n
                assert response.headers["X-RateLimit-Remaining"] == str(59 - n)
        for base in replicas:
            async with session.get(base + "/v1/tokens/1") as response:
                assert response.status == 429
                assert response.headers["Retry-After"] == response.headers["X-RateLimit-Reset"]


async def test_a_revocation_reaches_every_replica_within_5_seconds(
    replicas: list[str], db_url: str, redis_url: str
) -> None:
    key = await create_key(db_url, "basic")
    async with aiohttp.ClientSession(headers={"X-API-Key": key}) as session:
        for base in replicas:
            async with session.get(base + "/v1/usage") as response:
                assert response.status == 200
                assert (await response.json())["data"]["tier"] == "basic"
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "REDIS_URL": redis_url,
            "API_KEY_PEPPER": PEPPER.get_secret_value(),
        }
        for args, expected in ((("set-tier", key[:12], "pro"), 200), (("revoke", key[:12]), 403)):
            process = await asyncio.create_subprocess_exec(
                str(TOKVEL), "keys", *args, env=env, stdout=asyncio.subprocess.DEVNULL
            )
            assert await asyncio.wait_for(process.wait(), 60) == 0
            changed_at = time.monotonic()
            for base in replicas:
                while True:
                    async with session.get(base + "/v1/usage") as response:
                        done = response.status == expected and (
                            expected == 403 or (await response.json())["data"]["tier"] == "pro"
                        )
                    if done:
                        break
                    assert time.monotonic() - changed_at < 5, f"{base} still {response.status}"
                    await asyncio.sleep(0.05)
