"""Cache warming: the top tokens on start and after a Redis restart, popular ones ahead of expiry.

Restart detection. Every ``writer_warm_check_interval_seconds`` the warmer reads the ``run_id``
of every Redis primary and looks for :data:`~tokvel_common.cache.WARM_SENTINEL_KEY`. A changed
run id means a restart (whatever was persisted may be stale), a missing sentinel means the data
set is gone (FLUSHALL, or a restart without persistence); either way the top
``writer_warm_top_n`` tokens by market cap are written again, from PostgreSQL.

Predictive caching. The gateway counts reads per token in 5-minute buckets
(:func:`tokvel_common.cache.record_access`). Every ``writer_popular_refresh_interval_seconds``
the refresher takes the tokens read at least ``writer_popular_min_hits`` times in the current
and previous bucket (the last 5 to 10 minutes), the ``writer_popular_top_k`` most read, and
rewrites the keys of those whose ``token:`` key has less than
``writer_popular_refresh_ahead_seconds`` to live, or is already gone. Because the look-ahead is
longer than the interval, a popular token's key is renewed before it expires even when no new
sample arrives in time (a 60 s TTL against a 60 s poll). A popular key found already gone
counts as a miss (the prediction came too late), one found alive as a hit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from tokvel_common.cache import WARM_SENTINEL_KEY, recent_access_bucket_keys, token_key
from tokvel_common.redis_client import RedisClient
from writer.cache_writer import CacheWriter
from writer.metrics import WriterMetrics
from writer.repository import WriterRepository

log = logging.getLogger(__name__)

WarmReason = Literal["start", "restart", "flush"]


def warm_reason(
    previous: frozenset[str] | None, current: frozenset[str], sentinel_present: bool
) -> WarmReason | None:
    if previous is None:
        return "start"
    if current != previous:
        return "restart"
    if not sentinel_present:
        return "flush"
    return None


def _per_node(info: Mapping[str, Any], cluster: bool) -> list[Mapping[str, Any]]:
    """INFO answers one mapping on a standalone server, one per node on a cluster."""
    return list(info.values()) if cluster else [info]


async def _info(client: RedisClient, section: str) -> list[Mapping[str, Any]]:
    if isinstance(client, RedisCluster):
        info = await client.info(section, target_nodes=RedisCluster.PRIMARIES)
        return _per_node(info, cluster=True)
    return _per_node(await client.info(section), cluster=False)


async def redis_identity(client: RedisClient) -> frozenset[str]:
    """The run ids of the primaries: any restart changes them."""
    return frozenset(str(node["run_id"]) for node in await _info(client, "server"))


async def eviction_policies(client: RedisClient) -> set[str]:
    if isinstance(client, RedisCluster):
        # One answer per node, which redis-py's annotation does not describe.
        answers: dict[str, Any] = await client.config_get(  # type: ignore[assignment]
            "maxmemory-policy", target_nodes=RedisCluster.PRIMARIES
        )
        return {str(answer["maxmemory-policy"]) for answer in answers.values()}
    return {str((await client.config_get("maxmemory-policy"))["maxmemory-policy"])}


async def warn_about_eviction_policy(client: RedisClient) -> None:
    """Say so when Redis may evict un-expiring keys such as ws_subs:* (see tokvel_common.cache).

    Best effort: managed services often disable CONFIG.
    """
    try:
        policies = await eviction_policies(client)
    except RedisError:
        log.info("cannot read maxmemory-policy (CONFIG disabled?)", exc_info=True)
        return
    unsafe = {p for p in policies if not p.startswith("volatile-")}
    if unsafe:
        log.warning(
            "Redis maxmemory-policy should be volatile-lru: with this one, keys without a TTL "
            "(ws_subs:*) may be evicted or writes may fail when memory is full",
            extra={"maxmemory_policy": sorted(unsafe)},
        )


class CacheWarmer:
    def __init__(
        self,
        redis: RedisClient,
        repository: WriterRepository,
        cache_writer: CacheWriter,
        metrics: WriterMetrics,
        *,
        top_n: int,
        check_interval_seconds: float,
    ) -> None:
        self._redis = redis
        self._repository = repository
        self._cache_writer = cache_writer
        self._metrics = metrics
        self._top_n = top_n
        self._check_interval_seconds = check_interval_seconds
        self._identity: frozenset[str] | None = None

    async def warm(self, reason: WarmReason) -> int:
        snapshots = await self._repository.top_snapshots(self._top_n)
        await self._cache_writer.write_snapshots(snapshots)
        # Written last: if warming fails half way, the next check finds no sentinel and retries.
        marker = {"reason": reason, "tokens": len(snapshots), "at": datetime.now(UTC)}
        await self._redis.set(WARM_SENTINEL_KEY, orjson.dumps(marker))
        self._metrics.cache_warm_runs.labels(reason).inc()
        self._metrics.cache_warmed_tokens.inc(len(snapshots))
        log.info("cache warmed", extra={"reason": reason, "tokens": len(snapshots)})
        return len(snapshots)

    async def check(self) -> WarmReason | None:
        """Warm when this is the first check, Redis restarted, or its data set is gone."""
        identity = await redis_identity(self._redis)
        sentinel_present = bool(await self._redis.exists(WARM_SENTINEL_KEY))
        reason = warm_reason(self._identity, identity, sentinel_present)
        if reason in ("start", "restart"):
            await warn_about_eviction_policy(self._redis)
        if reason is not None:
            await self.warm(reason)
        self._identity = identity
        stats = await _info(self._redis, "stats")
        self._metrics.redis_keyspace_hits.set(sum(int(n["keyspace_hits"]) for n in stats))
        self._metrics.redis_keyspace_misses.set(sum(int(n["keyspace_misses"]) for n in stats))
        return reason

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception as exc:
                if isinstance(exc, RedisError | OSError):
                    self._metrics.redis_errors.labels("warm").inc()
                log.warning("cache warm check failed", exc_info=True)
            await asyncio.sleep(self._check_interval_seconds)


def select_popular(counts: Mapping[int, float], *, min_hits: int, top_k: int) -> list[int]:
    """The ``top_k`` most read tokens with at least ``min_hits`` reads (ties by cmc id)."""
    eligible = [(hits, cmc_id) for cmc_id, hits in counts.items() if hits >= min_hits]
    eligible.sort(key=lambda item: (-item[0], item[1]))
    return [cmc_id for _, cmc_id in eligible[:top_k]]


def merge_counts(buckets: Iterable[Iterable[tuple[bytes, float]]]) -> dict[int, float]:
    counts: dict[int, float] = {}
    for bucket in buckets:
        for member, score in bucket:
            cmc_id = int(member)
            counts[cmc_id] = counts.get(cmc_id, 0.0) + score
    return counts


def needs_refresh(pttl_ms: int, ahead_seconds: float) -> bool:
    """PTTL is -2 for a missing key, -1 for a key without TTL (never ours: rewrite it)."""
    return pttl_ms < 0 or pttl_ms < ahead_seconds * 1000


class PopularRefresher:
    def __init__(
        self,
        redis: RedisClient,
        repository: WriterRepository,
        cache_writer: CacheWriter,
        metrics: WriterMetrics,
        *,
        interval_seconds: float,
        ahead_seconds: float,
        min_hits: int,
        top_k: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._repository = repository
        self._cache_writer = cache_writer
        self._metrics = metrics
        self._interval_seconds = interval_seconds
        self._ahead_seconds = ahead_seconds
        self._min_hits = min_hits
        self._top_k = top_k
        self._clock = clock

    async def refresh_once(self) -> list[int]:
        """Refresh the popular tokens about to expire; returns their cmc ids."""
        if self._top_k == 0:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for key in recent_access_bucket_keys(self._clock()):
            # Read more than top_k per bucket: a token can be popular over both buckets only.
            pipe.zrevrange(key, 0, 2 * self._top_k - 1, withscores=True)
        counts = merge_counts(await pipe.execute())
        popular = select_popular(counts, min_hits=self._min_hits, top_k=self._top_k)
        if not popular:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for cmc_id in popular:
            pipe.pttl(token_key(cmc_id))
        ttls: list[int] = await pipe.execute()
        due: list[int] = []
        for cmc_id, pttl in zip(popular, ttls, strict=True):
            self._metrics.cache_popular_checks.labels("miss" if pttl == -2 else "hit").inc()
            if needs_refresh(pttl, self._ahead_seconds):
                due.append(cmc_id)
        if due:
            await self._cache_writer.write_snapshots(await self._repository.snapshots(due))
            self._metrics.cache_popular_refreshed.inc(len(due))
        return due

    async def run(self) -> None:
        while True:
            try:
                await self.refresh_once()
            except Exception as exc:
                if isinstance(exc, RedisError | OSError):
                    self._metrics.redis_errors.labels("popular_refresh").inc()
                log.warning("popular-token refresh failed", exc_info=True)
            await asyncio.sleep(self._interval_seconds)
