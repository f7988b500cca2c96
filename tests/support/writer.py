"""Running the writer under test: in-process (most tests) or as a real process (crash tests)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from tokvel_common.settings import CommonSettings
from writer import app
from writer.settings import WriterSettings

T = TypeVar("T")
Scraped = dict[tuple[str, frozenset[tuple[str, str]]], float]  # (sample name, labels) -> value

# Short intervals so that tests see warming, refreshes and retries within seconds.
FAST: dict[str, Any] = {
    "writer_batch_max_rows": 500,
    "writer_batch_max_seconds": 0.2,
    "writer_retry_max_seconds": 1.0,
    "writer_kafka_session_timeout_ms": 6000,
    "writer_warm_check_interval_seconds": 0.5,
    "writer_popular_refresh_interval_seconds": 1.0,
    "writer_popular_refresh_ahead_seconds": 5.0,
    "writer_shutdown_timeout_seconds": 10.0,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def writer_settings(base: CommonSettings, **overrides: Any) -> WriterSettings:
    values = {**dict(base), **FAST, "writer_ops_port": free_port(), **overrides}
    for name in ("database_url", "redis_url"):
        if isinstance(values[name], str):
            values[name] = SecretStr(values[name])
    return WriterSettings.model_validate(values)


def environment(settings: WriterSettings) -> dict[str, str]:
    """The settings as the environment variables of a writer process."""
    env: dict[str, str] = {}
    for name, value in dict(settings).items():
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        env[name.upper()] = str(raw).lower() if isinstance(raw, bool) else str(raw)
    return env


@asynccontextmanager
async def running_writer(settings: WriterSettings) -> AsyncIterator[asyncio.Task[None]]:
    """The writer in this event loop; stopped like SIGTERM stops it when the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(app.serve(settings, stop), name="writer-under-test")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    within: float = 30.0,
    interval: float = 0.2,
) -> T:
    """The first truthy result of ``probe``, polled; fails naming ``what`` after ``within`` s."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await probe()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what} (last: {result!r})")
        await asyncio.sleep(interval)


async def scrape(settings: WriterSettings) -> Scraped:
    """The writer's /metrics as ``{(sample name, labels): value}``."""
    url = f"http://127.0.0.1:{settings.writer_ops_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(scraped: Scraped, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent), labels given or not."""
    return scraped.get((name, frozenset(labels.items())), 0.0)


async def ops_get(settings: WriterSettings, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{settings.writer_ops_port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()
