"""Composition root of the ingestor: settings in, clients wired, lifecycle owned, clean stop."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
from aiokafka import AIOKafkaProducer

from ingestor.cmc_client import CmcClient, RetryPolicy
from ingestor.lease import RedisLease, lease_key
from ingestor.ledger import Ledger, LedgerStore, recover
from ingestor.metrics import IngestorMetrics
from ingestor.poller import PollConfig, Poller
from ingestor.publisher import Publisher
from ingestor.settings import IngestorSettings
from ingestor.token_info import TokenInfoRefresher
from tokvel_common.kafka import create_producer
from tokvel_common.ops import ops_server
from tokvel_common.redis_client import RedisClient, create_redis
from tokvel_common.topics import DEAD_LETTERS, RAW_QUOTES, TOKEN_INFO, prefixed

log = logging.getLogger(__name__)


@asynccontextmanager
async def _redis(settings: IngestorSettings) -> AsyncIterator[RedisClient]:
    client = create_redis(settings.redis_url.get_secret_value(), cluster=settings.redis_cluster)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def _http(settings: IngestorSettings) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=settings.cmc_request_timeout_seconds)
    session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False)
    try:
        yield session
    finally:
        await session.close()


@asynccontextmanager
async def _producer(settings: IngestorSettings) -> AsyncIterator[AIOKafkaProducer]:
    producer = create_producer(
        settings.kafka_bootstrap_servers,
        client_id=f"tokvel-ingestor-{settings.ingestor_instance_id}",
        linger_ms=settings.ingestor_linger_ms,
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()  # flushes whatever is still batched


async def run(
    settings: IngestorSettings, stop: asyncio.Event, metrics: IngestorMetrics | None = None
) -> int:
    """Run the ingestor until ``stop`` is set; the exit code."""
    metrics = metrics or IngestorMetrics()
    raw_topic = prefixed(settings.topic_prefix, RAW_QUOTES)
    client_id = f"tokvel-ingestor-{settings.ingestor_instance_id}"
    takeover = settings.ingestor_lease_ttl_seconds * 4 / 3
    if takeover > settings.poll_interval_seconds:
        log.warning(
            "a standby takes over later than one poll interval; lower INGESTOR_LEASE_TTL_SECONDS",
            extra={"takeover_s": takeover, "interval_s": settings.poll_interval_seconds},
        )
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(_redis(settings))
        session = await stack.enter_async_context(_http(settings))
        producer = await stack.enter_async_context(_producer(settings))
        publisher = Publisher(
            producer, metrics, stop, retry_max_seconds=settings.ingestor_delivery_retry_max_seconds
        )
        lease = RedisLease(
            redis,
            lease_key(raw_topic),
            settings.ingestor_instance_id,
            settings.ingestor_lease_ttl_seconds,
            metrics,
        )
        store = LedgerStore(redis, raw_topic)

        async def recover_ledger() -> Ledger:
            return await recover(
                store,
                settings.kafka_bootstrap_servers,
                raw_topic,
                now_ms=int(time.time() * 1000),
                lookback_seconds=settings.ingestor_dedupe_lookback_seconds,
                metrics=metrics,
                client_id=client_id,
            )

        poller = Poller(
            client=CmcClient(
                session, settings.cmc_base_url, settings.cmc_api_key.get_secret_value(), metrics
            ),
            publisher=publisher,
            lease=lease,
            store=store,
            recover=recover_ledger,
            info=TokenInfoRefresher(
                redis,
                publisher,
                prefixed(settings.topic_prefix, TOKEN_INFO),
                metrics,
                refresh_seconds=settings.cmc_info_refresh_seconds,
                batch_size=settings.cmc_info_batch_size,
            ),
            config=PollConfig(
                version=settings.cmc_api_version,
                page_limit=settings.cmc_page_limit,
                interval=settings.poll_interval_seconds,
                raw_topic=raw_topic,
                dlq_topic=prefixed(settings.topic_prefix, DEAD_LETTERS),
            ),
            policy=RetryPolicy(
                max_attempts=settings.cmc_max_attempts,
                backoff_base=settings.cmc_backoff_base_seconds,
                backoff_max=settings.cmc_backoff_max_seconds,
                window=settings.cmc_rate_limit_window_seconds,
            ),
            metrics=metrics,
            stop=stop,
            rng=random.Random(),  # noqa: S311 - jitter, not cryptography
        )

        async def redis_ready() -> bool:
            return bool(await redis.ping())

        async def kafka_ready() -> bool:
            return bool(await producer.partitions_for(raw_topic))

        async def polling_ready() -> bool:
            return poller.stopped_reason is None

        checks = {"redis": redis_ready, "kafka": kafka_ready, "polling": polling_ready}
        ops = ops_server(
            settings.ingestor_ops_host, settings.ingestor_ops_port, checks, metrics.registry
        )
        await stack.enter_async_context(ops)
        log.info(
            "ingestor started",
            extra={
                "instance": settings.ingestor_instance_id,
                "cmc_base_url": settings.cmc_base_url,
                "api_version": settings.cmc_api_version,
                "topic": raw_topic,
                "interval_s": settings.poll_interval_seconds,
            },
        )
        lease_stop = asyncio.Event()
        lease_task = asyncio.create_task(lease.run(lease_stop), name="polling-lease")
        try:
            stopped_for = await poller.run()
        finally:
            lease_stop.set()
            await lease_task
        if stopped_for is not None:
            # Nothing more to do, but /metrics and /readyz keep telling why until shut down.
            await stop.wait()
        log.info("ingestor stopped")
    return 0
