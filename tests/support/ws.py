"""Helpers of the WebSocket broadcaster's tests: samples, keys, serving the app, clients."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from pydantic import SecretStr

from tests.support.kafka import produce
from tokvel_common.apikeys import INSERT_KEY, display_prefix, generate_key, hash_key
from tokvel_common.events import MetricsSample, WindowCoverage
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import METRICS, prefixed
from ws_broadcaster.app import create_app
from ws_broadcaster.settings import WsSettings
from ws_broadcaster.state import BROADCASTER, CONSUMER
from ws_broadcaster.state import METRICS as METRICS_KEY

PEPPER = SecretStr("ws-integration-test-pepper")
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)

# Short intervals so that tests see heartbeats, sweeps and closes within seconds.
FAST: dict[str, Any] = {
    "api_key_pepper": PEPPER,
    "ws_host": "127.0.0.1",
    "ws_heartbeat_seconds": 5.0,
    "ws_instance_heartbeat_seconds": 0.3,
    "ws_instance_ttl_seconds": 1.5,
    "ws_sweep_interval_seconds": 0.5,
    "ws_close_timeout_seconds": 1.0,
    "ws_shutdown_timeout_seconds": 3.0,
    "log_level": "WARNING",
}


def make_sample(cmc_id: int, minute: int = 0, **changes: Any) -> MetricsSample:
    """A plausible enriched sample of ``cmc_id`` at EPOCH + ``minute`` minutes."""
    fields: dict[str, Any] = {
        "cmc_id": cmc_id,
        "symbol": f"T{cmc_id}",
        "name": f"Token {cmc_id}",
        "slug": f"token-{cmc_id}",
        "cmc_rank": cmc_id,
        "ts": EPOCH + timedelta(minutes=minute),
        "price_usd": 1.5 + minute,
        "market_cap_usd": 1_000_000.0,
        "volume_24h_usd": 50_000.0,
        "circulating_supply": 666_666.0,
        "total_supply": 1_000_000,
        "max_supply": None,
        "percent_change_1h": 0.1,
        "percent_change_24h": -1.2,
        "percent_change_7d": 3.4,
        "velocity": 0.05,
        "velocity_1h": 0.05,
        "velocity_4h": None,
        "velocity_12h": None,
        "velocity_24h": 0.05,
        "velocity_7d": None,
        "coverage": {"1h": WindowCoverage(points_used=1, points_expected=60)},
        "trend": "insufficient_data",
        "data_quality_score": 0.9,
        "quality_flags": [],
        "polled_at": EPOCH + timedelta(minutes=minute, seconds=5),
    }
    fields.update(changes)
    return MetricsSample.model_validate(fields)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ws_settings(
    base: CommonSettings, *, topic_prefix: str, database_url: str, redis_url: str, **overrides: Any
) -> WsSettings:
    values: dict[str, Any] = {
        **dict(base),
        **FAST,
        "topic_prefix": topic_prefix,
        "database_url": SecretStr(database_url),
        "redis_url": SecretStr(redis_url),
        "ws_port": free_port(),
        "ws_instance_id": f"test-{uuid.uuid4().hex[:8]}",
    }
    values.update(overrides)
    return WsSettings.model_validate(values)


def environment(settings: WsSettings) -> dict[str, str]:
    """The settings as the environment variables of a ``tokvel run ws`` process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        raw = getattr(settings, name)
        if isinstance(raw, SecretStr):
            value = raw.get_secret_value()
        if isinstance(value, bool):
            env[name.upper()] = str(value).lower()
        elif isinstance(value, dict | list):
            env[name.upper()] = orjson.dumps(value).decode()
        else:
            env[name.upper()] = str(value)
    return env


async def create_key(database_url: str, tier: str = "basic", name: str = "ws-test") -> str:
    """A new API key in ``api_keys``, made with the shared module (as ``tokvel keys`` does)."""
    key = generate_key()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(INSERT_KEY, hash_key(key, PEPPER), display_prefix(key), name, tier)
    finally:
        await conn.close()
    return key


@dataclass
class Served:
    app: web.Application
    settings: WsSettings
    url: str  # ws://127.0.0.1:port/v1/ws
    http: str  # http://127.0.0.1:port

    def scrape(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.app[METRICS_KEY].registry).decode()

    def metric(self, name: str, **labels: str) -> float:
        """A counter/gauge value of this app's registry (0 when absent)."""
        value = self.app[METRICS_KEY].registry.get_sample_value(name, labels or None)
        return value or 0.0

    @property
    def broadcaster(self) -> Any:
        return self.app[BROADCASTER]


@asynccontextmanager
async def serve(settings: WsSettings) -> AsyncIterator[Served]:
    """The app served for real on its loopback port, ready (partitions assigned)."""
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.ws_host, settings.ws_port)
        await site.start()
        async with asyncio.timeout(30):
            await app[CONSUMER].ready.wait()
        base = f"{settings.ws_host}:{settings.ws_port}"
        yield Served(app, settings, f"ws://{base}/v1/ws", f"http://{base}")
    finally:
        await runner.cleanup()


async def publish(
    settings: CommonSettings,
    samples: Sequence[MetricsSample],
    *,
    chunk: int | None = None,
    pause_seconds: float = 0.0,
) -> None:
    """Samples into the test's token.metrics, keyed by cmc id like the velocity processor."""
    await produce(
        settings.kafka_bootstrap_servers,
        prefixed(settings.topic_prefix, METRICS),
        [(s.cmc_id, s) for s in samples],
        chunk=chunk,
        pause_seconds=pause_seconds,
    )


async def receive_json(ws: aiohttp.ClientWebSocketResponse, within: float = 10.0) -> Any:
    msg = await ws.receive(timeout=within)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return orjson.loads(msg.data)


async def receive_until(
    ws: aiohttp.ClientWebSocketResponse,
    done: Callable[[list[Any]], bool],
    within: float = 15.0,
) -> list[Any]:
    """Messages until ``done(received)`` holds; fails after ``within`` seconds."""
    received: list[Any] = []
    async with asyncio.timeout(within):
        while not done(received):
            received.append(await receive_json(ws, within))
    return received


async def eventually(check: Callable[[], Any], within: float = 10.0, every: float = 0.1) -> Any:
    """Poll an async or sync ``check`` until it returns something truthy."""
    async with asyncio.timeout(within):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(every)


@dataclass
class Instance:
    """A ``tokvel run ws`` process."""

    process: asyncio.subprocess.Process
    settings: WsSettings
    url: str
    http: str


def _append(path: Any) -> BinaryIO:
    return open(path, "ab")


@asynccontextmanager
async def running_instance(settings: WsSettings, log_path: Any) -> AsyncIterator[Instance]:
    """``tokvel run ws`` as a real process, ready; killed at the end if still running."""
    import os
    import sys
    from pathlib import Path

    tokvel = Path(sys.executable).with_name("tokvel")
    env = {**os.environ, **environment(settings)}
    with _append(log_path) as log:
        process = await asyncio.create_subprocess_exec(
            str(tokvel), "run", "ws", env=env, stdout=log, stderr=log
        )
    base = f"{settings.ws_host}:{settings.ws_port}"
    instance = Instance(process, settings, f"ws://{base}/v1/ws", f"http://{base}")
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                if process.returncode is not None:
                    raise AssertionError(f"tokvel run ws exited with {process.returncode}")
                try:
                    async with session.get(instance.http + "/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(ready, within=30.0, every=0.1)
        yield instance
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
