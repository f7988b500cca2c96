"""The gateway's composition root: ``create_app(settings)``.

Resources are opened in dependency order, each in its own ``cleanup_ctx`` generator, and closed
in reverse: the PostgreSQL pool, the Redis client, the services built on both (repository,
readers, key cache, limiter), the quota flusher and the access-count flusher (each flushes once
more on shutdown), the key-change listener, the cache invalidation listener. ``web.run_app``
(in ``__main__``) turns SIGTERM into that orderly shutdown.

The pool starts empty (min size 0) so the gateway starts, and serves what Redis holds, while
PostgreSQL is still unavailable; ``/readyz`` reports ready when PostgreSQL or Redis answers,
since either lets the gateway answer requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from api_gateway.access import AccessCounter
from api_gateway.auth import Authenticator
from api_gateway.cache_aside import TokenReader
from api_gateway.errors import DatabaseUnavailable
from api_gateway.local_cache import LocalCache
from api_gateway.metrics import GatewayMetrics
from api_gateway.middleware import guard, observe
from api_gateway.openapi import openapi_bytes
from api_gateway.quota import QuotaTracker
from api_gateway.ratelimit import RateLimiter
from api_gateway.redis_gate import RedisGate
from api_gateway.repository import GatewayRepository
from api_gateway.routes import setup_routes
from api_gateway.settings import GatewaySettings
from api_gateway.state import (
    ACCESS,
    AUTHENTICATOR,
    LIMITER,
    LOCAL_CACHE,
    METRICS,
    OPENAPI,
    POOL,
    QUOTA,
    READER,
    REDIS,
    REDIS_GATE,
    REPOSITORY,
    SETTINGS,
)
from tokvel_common.apikeys import KeyChange, KeyChangeListener
from tokvel_common.app_resources import (
    cancel_and_wait,
    postgres_pool,
    redis_client,
    stoppable_task,
)
from tokvel_common.invalidation import InvalidationListener
from tokvel_common.ops import add_ops_routes

log = logging.getLogger(__name__)

APPLICATION_NAME = "tokvel-api-gateway"
CLIENT_MAX_SIZE = 64 * 1024  # the API takes no bodies (any is refused with 413, unread)
FINAL_FLUSH_SECONDS = 5.0


async def _services(app: web.Application) -> AsyncIterator[None]:
    """Plain objects over the two clients; the key cache owns its lookups in flight."""
    settings, metrics, quota = app[SETTINGS], app[METRICS], app[QUOTA]
    repository = GatewayRepository(app[POOL], settings.db_timeout_seconds)
    gate = RedisGate(app[REDIS], metrics, retry_seconds=settings.redis_retry_seconds)
    access = AccessCounter(gate)
    app[REPOSITORY] = repository
    app[REDIS_GATE] = gate
    app[ACCESS] = access
    app[READER] = TokenReader(gate, repository, metrics, access, app[LOCAL_CACHE])
    authenticator = Authenticator(
        repository, settings, quota, metrics, stale_seconds=settings.api_key_stale_seconds
    )
    app[AUTHENTICATOR] = authenticator
    app[LIMITER] = RateLimiter(
        gate, quota, metrics, local_divisor=settings.rate_limit_local_divisor
    )
    try:
        yield
    finally:
        await authenticator.keys.close()


async def _quota_flusher(app: web.Application) -> AsyncIterator[None]:
    quota, repository = app[QUOTA], app[REPOSITORY]
    task = asyncio.create_task(
        quota.run(repository, app[SETTINGS].quota_flush_interval_seconds), name="quota-flusher"
    )
    try:
        yield
    finally:
        await cancel_and_wait(task)
        # Requests counted since the last flush: one bounded last attempt.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINAL_FLUSH_SECONDS):
                if not await quota.flush(repository):
                    log.warning(
                        "stopping with uncounted requests",
                        extra={"requests": quota.pending_requests},
                    )


async def _access_counts(app: web.Application) -> AsyncIterator[None]:
    access = app[ACCESS]
    task = asyncio.create_task(access.run(), name="access-counts")
    try:
        yield
    finally:
        await cancel_and_wait(task)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINAL_FLUSH_SECONDS):
                await access.flush()


async def _key_changes(app: web.Application) -> AsyncIterator[None]:
    authenticator, limiter, metrics = app[AUTHENTICATOR], app[LIMITER], app[METRICS]

    def on_change(change: KeyChange) -> None:
        metrics.key_changes.inc()
        authenticator.keys.drop(change.key_hash)
        limiter.drop(change.key_hash)

    listener = KeyChangeListener(
        app[SETTINGS].redis_url.get_secret_value(), on_change, authenticator.keys.reset
    )
    async with stoppable_task(listener.run(), listener.stop, "api-key-changes"):
        yield


async def _invalidations(app: web.Application) -> AsyncIterator[None]:
    """The writer's announcements drop entries of the in-process answer cache."""
    local = app[LOCAL_CACHE]
    listener = InvalidationListener(
        app[REDIS], app[SETTINGS].redis_url.get_secret_value(), local.invalidate, local.reset
    )
    local.attach(listener.subscribed)
    async with stoppable_task(listener.run(), listener.stop, "cache-invalidations"):
        yield


def _readiness(app: web.Application) -> dict[str, Callable[[], Awaitable[bool]]]:
    async def postgres() -> bool:
        try:
            return await app[REPOSITORY].ping()
        except DatabaseUnavailable:
            return False

    async def redis() -> bool:
        try:
            return bool(await app[REDIS].ping())
        except (RedisError, OSError):
            return False

    async def storage() -> bool:
        # Either store lets the gateway answer: not ready only when both are gone.
        results = await asyncio.gather(postgres(), redis())
        return any(results)

    return {"storage": storage}


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(middlewares=[observe, guard], client_max_size=CLIENT_MAX_SIZE)
    metrics = GatewayMetrics(CollectorRegistry())
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[QUOTA] = QuotaTracker(metrics)
    app[OPENAPI] = openapi_bytes()
    app[LOCAL_CACHE] = LocalCache(settings.local_cache_seconds)
    for ctx in (
        postgres_pool(
            POOL,
            settings.database_url,
            max_size=settings.db_pool_max_size,
            command_timeout=settings.db_timeout_seconds,
            application_name=APPLICATION_NAME,
        ),
        redis_client(
            REDIS,
            settings.redis_url,
            cluster=settings.redis_cluster,
            socket_timeout=settings.redis_timeout_seconds,
        ),
        _services,
        _quota_flusher,
        _access_counts,
        _key_changes,
        _invalidations,
    ):
        app.cleanup_ctx.append(ctx)
    setup_routes(app)
    add_ops_routes(app, _readiness(app), metrics.registry)
    return app
