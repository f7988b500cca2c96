"""The writer's composition root: every resource opened in dependency order, closed in reverse.

SIGTERM (or SIGINT) stops the consumer loop, which writes the batch in hand and commits its
offsets; pending cache updates get a short grace period; then the background tasks are
cancelled and the consumer (leaving its group), the producer, Redis and the pool are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from typing import Any, Protocol, TypeVar

import asyncpg
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from tokvel_common.app_resources import stoppable_task
from tokvel_common.db.pool import create_pool
from tokvel_common.invalidation import Invalidation, InvalidationListener, publish
from tokvel_common.kafka import create_consumer, create_producer
from tokvel_common.logging import configure_logging, mask_dsn
from tokvel_common.ops import ops_server
from tokvel_common.redis_client import RedisClient, create_redis
from tokvel_common.topics import DEAD_LETTERS, METRICS, TOKEN_INFO, prefixed
from writer.batcher import Batcher
from writer.cache_writer import CacheWriter
from writer.consumer import WriterLoop, WriterRebalanceListener
from writer.maintenance import PartitionDays, PartitionMaintainer
from writer.metrics import WriterMetrics
from writer.persister import BatchPersister, KafkaDeadLetters, PreparedBatch, start_worker
from writer.repository import WriterRepository
from writer.settings import WriterSettings
from writer.warmer import CacheWarmer, PopularRefresher

log = logging.getLogger(__name__)

CLIENT_ID = "tokvel-writer"
# Writes are sequential; the rest (cache reads, warming, maintenance, readiness) is light.
POOL_MAX_SIZE = 4
CACHE_DRAIN_SECONDS = 2.0


class _KafkaClient(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


KafkaClientT = TypeVar("KafkaClientT", bound=_KafkaClient)


@contextlib.asynccontextmanager
async def _database(settings: WriterSettings) -> AsyncIterator[asyncpg.Pool]:
    # min_size=0: the writer starts (and waits, paused) while PostgreSQL is still unavailable.
    pool = await create_pool(
        settings.database_url.get_secret_value(),
        min_size=0,
        max_size=POOL_MAX_SIZE,
        application_name=CLIENT_ID,
    )
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _redis(settings: WriterSettings) -> AsyncIterator[RedisClient]:
    client = create_redis(
        settings.redis_url.get_secret_value(),
        cluster=settings.redis_cluster,
        socket_timeout=settings.writer_redis_timeout_seconds,
    )
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _workers(processes: int) -> AsyncIterator[ProcessPoolExecutor | None]:
    """The processes that prepare batches (none: this process prepares them)."""
    if processes == 0:
        yield None
        return
    pool = ProcessPoolExecutor(
        processes,
        # Not fork: this process has threads (the event loop's executor) by now.
        mp_context=multiprocessing.get_context("spawn"),
        initializer=start_worker,
        initargs=(os.getpid(),),
    )
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.asynccontextmanager
async def _started(client: KafkaClientT) -> AsyncIterator[KafkaClientT]:
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


@contextlib.asynccontextmanager
async def _background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """A task owned by this block: cancelled and awaited when the block ends."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def _stop_on_signals(stop: asyncio.Event) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _stop_when_set(stop: asyncio.Event, loop: WriterLoop[PreparedBatch]) -> None:
    await stop.wait()
    loop.request_stop()


async def run(settings: WriterSettings) -> int:
    """The process: JSON logs, SIGTERM/SIGINT -> clean stop."""
    configure_logging("writer", settings.log_level)
    # Every batch keeps thousands of objects alive long enough to reach the oldest generation,
    # so full collections are frequent; without this each one walks every object the imports
    # made too (py-spy under bench/writer_throughput.py: about a tenth of the writer's CPU).
    gc.freeze()
    stop = asyncio.Event()
    async with _stop_on_signals(stop):
        await serve(settings, stop)
    return 0


async def serve(settings: WriterSettings, stop: asyncio.Event) -> None:
    """Consume, write and cache until ``stop`` is set, then shut down cleanly."""
    log.info(
        "writer starting",
        extra={
            "database": mask_dsn(settings.database_url.get_secret_value()),
            "redis_cluster": settings.redis_cluster,
            "topic_prefix": settings.topic_prefix,
        },
    )
    registry = CollectorRegistry()
    metrics = WriterMetrics(registry)
    batcher = Batcher(settings.writer_batch_max_rows, settings.writer_batch_max_seconds)
    listener = WriterRebalanceListener(batcher, metrics)
    metrics_topic = prefixed(settings.topic_prefix, METRICS)
    info_topic = prefixed(settings.topic_prefix, TOKEN_INFO)
    consumer = create_consumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        # Namespaced like the topics, so isolated test runs never share a group.
        group_id=prefixed(settings.topic_prefix, settings.writer_group_id),
        client_id=CLIENT_ID,
        session_timeout_ms=settings.writer_kafka_session_timeout_ms,
    )
    consumer.subscribe([metrics_topic, info_topic], listener=listener)
    producer = create_producer(settings.kafka_bootstrap_servers, client_id=CLIENT_ID)

    async with _database(settings) as pool, _redis(settings) as redis:
        repository = WriterRepository(pool)
        days = PartitionDays(repository, metrics)
        cache_writer = CacheWriter(
            redis,
            repository,
            metrics,
            retry_max_seconds=settings.writer_retry_max_seconds,
            min_interval_seconds=settings.writer_cache_min_interval_seconds,
        )

        async def redis_ready() -> bool:
            return bool(await redis.ping())

        async def kafka_ready() -> bool:
            return listener.joined.is_set()

        async def announce_drop(before: date) -> None:
            try:
                await publish(redis, Invalidation(kind="partitions", before=before))
            except RedisError:
                metrics.redis_errors.labels("publish").inc()
                log.warning("could not announce dropped partitions", exc_info=True)

        def on_invalidation(message: Invalidation) -> None:
            if message.kind == "partitions" and message.before is not None:
                days.forget_before(message.before)

        maintainer = PartitionMaintainer(
            repository,
            days,
            metrics,
            retention_days=settings.writer_retention_days,
            ahead_days=settings.writer_partitions_ahead_days,
            interval_seconds=settings.writer_maintenance_interval_seconds,
            lock_timeout_seconds=settings.writer_maintenance_lock_timeout_seconds,
            on_dropped=announce_drop,
        )
        warmer = CacheWarmer(
            redis,
            repository,
            cache_writer,
            metrics,
            top_n=settings.writer_warm_top_n,
            check_interval_seconds=settings.writer_warm_check_interval_seconds,
        )
        popular = PopularRefresher(
            redis,
            repository,
            cache_writer,
            metrics,
            interval_seconds=settings.writer_popular_refresh_interval_seconds,
            ahead_seconds=settings.writer_popular_refresh_ahead_seconds,
            min_hits=settings.writer_popular_min_hits,
            top_k=settings.writer_popular_top_k,
        )
        invalidations = InvalidationListener(
            redis, settings.redis_url.get_secret_value(), on_invalidation, days.reset
        )
        checks = {"postgres": repository.ping, "redis": redis_ready, "kafka": kafka_ready}

        async with (
            _workers(settings.writer_prepare_processes) as workers,
            ops_server(settings.writer_ops_host, settings.writer_ops_port, checks, registry),
            _started(producer),
            _started(consumer),
        ):
            persister = BatchPersister(
                repository,
                days,
                cache_writer,
                KafkaDeadLetters(producer, prefixed(settings.topic_prefix, DEAD_LETTERS)),
                metrics,
                metrics_topic=metrics_topic,
                info_topic=info_topic,
                workers=workers,
            )
            loop = WriterLoop(
                consumer,
                batcher,
                persister,
                metrics,
                retry_max_seconds=settings.writer_retry_max_seconds,
                shutdown_timeout_seconds=settings.writer_shutdown_timeout_seconds,
                # One batch in preparation per worker process: each works on its own.
                prepare_depth=max(1, settings.writer_prepare_processes),
            )
            async with (
                _background(_stop_when_set(stop, loop), "stop-watcher"),
                _background(cache_writer.run(), "cache-writer"),
                _background(maintainer.run(), "partition-maintenance"),
                _background(warmer.run(), "cache-warmer"),
                _background(popular.run(), "popular-refresh"),
                # Asked to stop, not only cancelled: a cancel landing inside redis-py's pub/sub
                # read can be absorbed (app_resources.stop_and_wait).
                stoppable_task(invalidations.run(), invalidations.stop, "invalidation-listener"),
            ):
                log.info("writer running", extra={"topics": [metrics_topic, info_topic]})
                await loop.run()
                if not await cache_writer.drain(CACHE_DRAIN_SECONDS):
                    log.warning("stopping with cache updates pending (Redis unavailable)")
    log.info("writer stopped")
