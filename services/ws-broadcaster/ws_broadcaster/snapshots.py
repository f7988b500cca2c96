"""A token's current state for a new subscriber: Redis first (the writer's ``token:{id}``
key), PostgreSQL (``tokens`` + ``token_latest``) for what Redis does not hold or when it fails.

Several tokens are looked up together: one pipeline of GETs (single-key commands, so a Redis
Cluster splits it per node), then one query for the misses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from pydantic import ValidationError

from tokvel_common.cache import TokenMetadata, TokenSnapshot, decode_value, token_key
from tokvel_common.events import MetricsSample
from tokvel_common.redis_client import RedisClient
from ws_broadcaster.metrics import WsMetrics
from ws_broadcaster.registry import REDIS_ERRORS
from ws_broadcaster.repository import DatabaseUnavailable, WsRepository

log = logging.getLogger(__name__)

SnapshotSourceName = Literal["redis", "postgres", "none"]
DECODE_ERRORS: Final = (ValidationError, ValueError)
REDIS_CONCURRENCY: Final = 16
CACHE_ENTRIES: Final = 50_000


@dataclass(frozen=True)
class StoredSnapshot:
    """What storage knows of a token; both None when no store has heard of it (yet)."""

    token: TokenMetadata | None
    sample: MetricsSample | None
    source: SnapshotSourceName


@dataclass
class SnapshotResult:
    found: dict[int, StoredSnapshot] = field(default_factory=dict)
    unavailable: set[int] = field(default_factory=set)  # neither store answered for these


class SnapshotSource:
    def __init__(
        self,
        redis: RedisClient,
        repository: WsRepository,
        metrics: WsMetrics,
        *,
        redis_timeout: float,
        cache_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._repository = repository
        self._metrics = metrics
        self._redis_timeout = redis_timeout
        # Bounds this source's share of the Redis pool (a connect storm must not exhaust it).
        self._redis_slots = asyncio.Semaphore(REDIS_CONCURRENCY)
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[int, tuple[float, StoredSnapshot]] = {}

    async def fetch(self, cmc_ids: Sequence[int]) -> SnapshotResult:
        """Each token's stored state. Lookups are kept ``cache_seconds``: thousands of clients
        (re)connecting at once cost one lookup per token, not one per client. The subscriber
        misses nothing by it: the broadcaster replaces a stale sample with the newest it has
        read, and the updates after it follow."""
        result = SnapshotResult()
        now = self._clock()
        missing: list[int] = []
        for cmc_id in cmc_ids:
            cached = self._cache.get(cmc_id)
            if cached is not None and now - cached[0] < self._cache_seconds:
                result.found[cmc_id] = cached[1]
            else:
                missing.append(cmc_id)
        if missing:
            fetched = await self._fetch(missing)
            result.unavailable = fetched.unavailable
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            for cmc_id, stored in fetched.found.items():
                result.found[cmc_id] = stored
                if self._cache_seconds > 0:
                    self._cache[cmc_id] = (now, stored)
        return result

    async def _fetch(self, cmc_ids: Sequence[int]) -> SnapshotResult:
        result = SnapshotResult()
        for cmc_id, raw in zip(cmc_ids, await self._from_redis(cmc_ids), strict=True):
            if raw is None:
                continue
            try:
                cached = decode_value(raw, TokenSnapshot)
            except DECODE_ERRORS:
                log.warning("undecodable token snapshot in redis", extra={"cmc_id": cmc_id})
                continue
            result.found[cmc_id] = StoredSnapshot(cached.token, cached.metrics, "redis")
            self._metrics.snapshots.labels("redis").inc()
        missing = [cmc_id for cmc_id in cmc_ids if cmc_id not in result.found]
        if not missing:
            return result
        try:
            stored = await self._repository.snapshots(missing)
        except DatabaseUnavailable:
            log.warning("snapshots unavailable", extra={"tokens": len(missing)}, exc_info=True)
            self._metrics.snapshots.labels("unavailable").inc(len(missing))
            result.unavailable.update(missing)
            return result
        for cmc_id in missing:
            row = stored.get(cmc_id)
            if row is None:
                result.found[cmc_id] = StoredSnapshot(None, None, "none")
                self._metrics.snapshots.labels("none").inc()
            else:
                result.found[cmc_id] = StoredSnapshot(row.token, row.sample, "postgres")
                self._metrics.snapshots.labels("postgres").inc()
        return result

    async def _from_redis(self, cmc_ids: Sequence[int]) -> list[bytes | None]:
        try:
            async with self._redis_slots, asyncio.timeout(self._redis_timeout):
                pipe = self._redis.pipeline(transaction=False)
                for cmc_id in cmc_ids:
                    pipe.get(token_key(cmc_id))
                values: list[bytes | None] = await pipe.execute()
                return values
        except REDIS_ERRORS:
            self._metrics.redis_errors.labels("snapshot").inc()
            log.warning("redis snapshot lookup failed: using postgres", exc_info=True)
            return [None] * len(cmc_ids)
