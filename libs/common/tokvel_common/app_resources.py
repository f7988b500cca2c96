"""The resources every aiohttp service opens the same way, as ``cleanup_ctx`` generators.

Each factory returns one generator that opens its resource, stores it under a typed
``web.AppKey`` and closes it in its ``finally``; ``create_app`` appends them in dependency order
and aiohttp closes them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
from aiohttp import web
from pydantic import SecretStr

from tokvel_common.db.pool import create_pool
from tokvel_common.logging import mask_dsn
from tokvel_common.redis_client import RedisClient, create_redis

log = logging.getLogger(__name__)

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def postgres_pool(
    key: web.AppKey[asyncpg.Pool],
    dsn: SecretStr,
    *,
    max_size: int,
    command_timeout: float,
    application_name: str,
) -> CleanupCtx:
    """A pool that starts empty (min size 0): the service starts, and serves what it can
    without PostgreSQL, while PostgreSQL is still unavailable."""

    async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await create_pool(
            dsn.get_secret_value(),
            min_size=0,
            max_size=max_size,
            command_timeout=command_timeout,
            application_name=application_name,
        )
        app[key] = pool
        log.info("postgres pool created", extra={"database": mask_dsn(dsn.get_secret_value())})
        try:
            yield
        finally:
            await pool.close()

    return pool_ctx


def redis_client(
    key: web.AppKey[RedisClient], url: SecretStr, *, cluster: bool, socket_timeout: float
) -> CleanupCtx:
    """A client whose every round trip is bounded by ``socket_timeout``."""

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        client = create_redis(
            url.get_secret_value(), cluster=cluster, socket_timeout=socket_timeout
        )
        app[key] = client
        try:
            yield
        finally:
            await client.aclose()

    return redis_ctx


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel a task this context owns and wait until it has ended."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def stop_and_wait(task: asyncio.Task[None], stop: Callable[[], None], grace: float) -> None:
    """Ask a task to return (``stop``), give it ``grace`` seconds, then cancel it.

    For loops that may absorb a cancellation landing at the wrong moment (redis-py's pub/sub
    reads): asked first, they end on their own.
    """
    stop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), grace)
    await cancel_and_wait(task)


# How long a Redis listener gets to return on its own before it is cancelled.
LISTENER_STOP_SECONDS = 2.0


@contextlib.asynccontextmanager
async def stoppable_task(
    loop: Coroutine[Any, Any, None], stop: Callable[[], None], name: str
) -> AsyncIterator[None]:
    """``loop`` runs as a task for the block; on the way out it is asked to stop first
    (:func:`stop_and_wait`, ``LISTENER_STOP_SECONDS``)."""
    task = asyncio.create_task(loop, name=name)
    try:
        yield
    finally:
        await stop_and_wait(task, stop, LISTENER_STOP_SECONDS)
