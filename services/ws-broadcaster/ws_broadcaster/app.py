"""The broadcaster's composition root: ``create_app(settings)``.

Resources are opened in dependency order, each in its own ``cleanup_ctx`` generator, and closed
in reverse: the PostgreSQL pool, the Redis client, the plain services over both (repository,
key resolver, snapshot source, registry, hub and resume buffer), the registry's heartbeat and
sweeper task, the Kafka consumer task, the API key change listener, the periodic re-check of
the open connections' keys. Every task is created in one of them, which cancels and awaits it
on the way out.

Shutdown (``web.run_app`` turns SIGTERM into it): the listening socket closes, ``on_shutdown``
sends every client a 1001 "going away" close frame and waits (bounded) for the handlers to
finish, then the contexts unwind: consumer stopped, this instance's Redis entries and heartbeat
removed at once (no waiting for the TTL), clients closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from tokvel_common.apikeys import KeyChange, KeyChangeListener
from tokvel_common.app_resources import (
    cancel_and_wait,
    postgres_pool,
    redis_client,
    stoppable_task,
)
from tokvel_common.ops import add_ops_routes
from tokvel_common.topics import METRICS as METRICS_TOPIC
from tokvel_common.topics import prefixed
from ws_broadcaster.auth import KeyResolver
from ws_broadcaster.broadcaster import Broadcaster
from ws_broadcaster.consumer import MetricsConsumer
from ws_broadcaster.handler import WS_PATH, websocket
from ws_broadcaster.metrics import WsMetrics
from ws_broadcaster.registry import REDIS_ERRORS, Registry
from ws_broadcaster.repository import DatabaseUnavailable, WsRepository
from ws_broadcaster.resume import ResumeBuffer
from ws_broadcaster.settings import WsSettings
from ws_broadcaster.snapshots import SnapshotSource
from ws_broadcaster.state import (
    BROADCASTER,
    BUFFER,
    CONSUMER,
    METRICS,
    POOL,
    REDIS,
    REGISTRY,
    REPOSITORY,
    RESOLVER,
    SETTINGS,
)

log = logging.getLogger(__name__)

APPLICATION_NAME = "tokvel-ws-broadcaster"


async def _services(app: web.Application) -> AsyncIterator[None]:
    """Plain objects over the two clients; the key resolver owns its in-flight lookups."""
    settings, metrics = app[SETTINGS], app[METRICS]
    repository = WsRepository(app[POOL], settings.ws_db_timeout_seconds)
    resolver = KeyResolver(repository, settings)
    registry = Registry(
        app[REDIS],
        settings.ws_instance_id,
        ttl_seconds=settings.ws_instance_ttl_seconds,
        timeout_seconds=settings.ws_redis_timeout_seconds,
        metrics=metrics,
    )
    app[REPOSITORY] = repository
    app[RESOLVER] = resolver
    app[REGISTRY] = registry
    app[BROADCASTER] = Broadcaster(
        instance_id=settings.ws_instance_id,
        metrics=metrics,
        buffer=app[BUFFER],
        snapshots=SnapshotSource(
            app[REDIS],
            repository,
            metrics,
            redis_timeout=settings.ws_redis_timeout_seconds,
            cache_seconds=settings.ws_snapshot_cache_seconds,
        ),
        registry=registry,
        snapshot_timeout=settings.ws_snapshot_timeout_seconds,
    )
    try:
        yield
    finally:
        await resolver.keys.close()


async def _registry(app: web.Application) -> AsyncIterator[None]:
    settings, registry, broadcaster = app[SETTINGS], app[REGISTRY], app[BROADCASTER]
    task = asyncio.create_task(
        registry.run(
            broadcaster.desired_registry,
            settings.ws_instance_heartbeat_seconds,
            settings.ws_sweep_interval_seconds,
        ),
        name="ws-registry",
    )
    try:
        yield
    finally:
        await cancel_and_wait(task)
        try:
            await registry.deregister()
        except REDIS_ERRORS:
            log.warning("could not deregister: the others will sweep this instance at its TTL")


async def _consumer(app: web.Application) -> AsyncIterator[None]:
    settings, broadcaster = app[SETTINGS], app[BROADCASTER]
    consumer = MetricsConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        topic=prefixed(settings.topic_prefix, METRICS_TOPIC),
        client_id=f"tokvel-ws-{settings.ws_instance_id}",
        buffer=app[BUFFER],
        on_record=broadcaster.publish_record,
    )
    app[CONSUMER] = consumer
    task = asyncio.create_task(consumer.run(), name="ws-consumer")
    try:
        yield
    finally:
        await cancel_and_wait(task)


async def _key_changes(app: web.Application) -> AsyncIterator[None]:
    resolver, broadcaster = app[RESOLVER], app[BROADCASTER]

    def on_change(change: KeyChange) -> None:
        resolver.keys.drop(change.key_hash)
        if change.action == "revoked" or change.action == "rotated":
            broadcaster.close_key(change.key_hash, change.action)

    listener = KeyChangeListener(
        app[SETTINGS].redis_url.get_secret_value(), on_change, resolver.keys.reset
    )
    async with stoppable_task(listener.run(), listener.stop, "ws-api-key-changes"):
        yield


async def _key_rechecks(app: web.Application) -> AsyncIterator[None]:
    resolver, broadcaster = app[RESOLVER], app[BROADCASTER]
    task = asyncio.create_task(
        broadcaster.run_key_rechecks(resolver.recheck, app[SETTINGS].api_key_cache_ttl_seconds),
        name="ws-api-key-rechecks",
    )
    try:
        yield
    finally:
        await cancel_and_wait(task)


async def _close_connections(app: web.Application) -> None:
    try:
        async with asyncio.timeout(app[SETTINGS].ws_shutdown_timeout_seconds):
            await app[BROADCASTER].close_all()
    except TimeoutError:
        log.warning("some clients did not finish closing in time")


def _readiness(app: web.Application) -> dict[str, Callable[[], Awaitable[bool]]]:
    async def kafka() -> bool:
        return app[CONSUMER].ready.is_set()

    async def postgres() -> bool:
        try:
            return await app[REPOSITORY].ping()
        except DatabaseUnavailable:
            return False

    return {"kafka": kafka, "postgres": postgres}


def create_app(settings: WsSettings) -> web.Application:
    app = web.Application()
    metrics = WsMetrics(CollectorRegistry())
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[BUFFER] = ResumeBuffer(settings.ws_resume_buffer_size, settings.ws_resume_max_entries)
    for ctx in (
        postgres_pool(
            POOL,
            settings.database_url,
            max_size=settings.ws_db_pool_max_size,
            command_timeout=settings.ws_db_timeout_seconds,
            application_name=APPLICATION_NAME,
        ),
        redis_client(
            REDIS,
            settings.redis_url,
            cluster=settings.redis_cluster,
            socket_timeout=settings.ws_redis_timeout_seconds,
        ),
        _services,
        _registry,
        _consumer,
        _key_changes,
        _key_rechecks,
    ):
        app.cleanup_ctx.append(ctx)
    app.on_shutdown.append(_close_connections)
    app.router.add_get(WS_PATH, websocket)
    add_ops_routes(app, _readiness(app), metrics.registry)
    return app
