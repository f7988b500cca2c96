"""Keeps Redis in step with what PostgreSQL committed, without ever holding a write up.

The consumer loop only records *what changed* (:meth:`CacheWriter.submit`, in memory, bounded
by the number of tokens); a background task turns that into Redis commands. New data refreshes
the ``token:`` and ``velocity:`` keys of the tokens it touched (read back from ``tokens`` and
``token_latest``, so a redelivered old sample can never roll the cache back), drops the list
pages it changes, and announces the change on the invalidation channel. When Redis is down the
changes accumulate and are written, once, when it answers again: PostgreSQL writes go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence

from redis.exceptions import RedisError

from tokvel_common.cache import (
    LIST_INDEX_KEY,
    CacheChange,
    TokenSnapshot,
    list_pages_to_drop,
    snapshot_entries,
)
from tokvel_common.invalidation import Invalidation, publish
from tokvel_common.redis_client import RedisClient
from writer.metrics import WriterMetrics
from writer.repository import WriterRepository

log = logging.getLogger(__name__)

# Tokens per pipeline (6 keys each): one round trip stays small and quick even when a whole
# warm-up or the catch-up after an outage is written.
PIPELINE_TOKENS = 100
INITIAL_RETRY_SECONDS = 0.2


def _chunks(items: Sequence[TokenSnapshot], size: int) -> Iterable[Sequence[TokenSnapshot]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class CacheWriter:
    def __init__(
        self,
        redis: RedisClient,
        repository: WriterRepository,
        metrics: WriterMetrics,
        *,
        retry_max_seconds: float = 5.0,
        min_interval_seconds: float = 0.0,
    ) -> None:
        self._redis = redis
        self._repository = repository
        self._metrics = metrics
        self._retry_max_seconds = retry_max_seconds
        self._min_interval_seconds = min_interval_seconds
        self._pending = CacheChange()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, change: CacheChange) -> None:
        """Record a committed change; the background task brings Redis up to date."""
        if not change:
            return
        self._pending.merge(change)
        self._metrics.cache_pending_tokens.set(len(self._pending.ids))
        self._idle.clear()
        self._wakeup.set()

    async def write_snapshots(self, snapshots: Sequence[TokenSnapshot]) -> int:
        """SET every key of these tokens with its TTL, in pipelines; returns keys written."""
        written = 0
        for chunk in _chunks(snapshots, PIPELINE_TOKENS):
            pipe = self._redis.pipeline(transaction=False)
            for snapshot in chunk:
                for key, value, ttl in snapshot_entries(snapshot):
                    pipe.set(key, value, ex=ttl)
                    written += 1
            await pipe.execute()
        self._metrics.cache_keys_written.inc(written)
        return written

    async def _drop_list_pages(self, change: CacheChange) -> int:
        index = await self._redis.hgetall(LIST_INDEX_KEY)
        dropped = list_pages_to_drop(index, change)
        if dropped:
            pipe = self._redis.pipeline(transaction=False)
            for page_key in dropped:
                # Not pipe.unlink(): on a ClusterPipeline that is a coroutine, not a queued
                # command. A raw single-key UNLINK queues the same way on both pipelines.
                pipe.execute_command("UNLINK", page_key)
                pipe.hdel(LIST_INDEX_KEY, page_key)
            await pipe.execute()
            self._metrics.list_pages_dropped.inc(len(dropped))
        return len(dropped)

    async def apply(self, change: CacheChange) -> None:
        """One attempt at bringing Redis up to date with ``change``; raises on failure."""
        snapshots = await self._repository.snapshots(sorted(change.ids))
        await self.write_snapshots(snapshots)
        await self._drop_list_pages(change)
        if change.metrics:
            await publish(self._redis, Invalidation(kind="metrics", cmc_ids=sorted(change.metrics)))
        if change.metadata:
            await publish(
                self._redis, Invalidation(kind="token_info", cmc_ids=sorted(change.metadata))
            )

    async def _apply_pending(self) -> bool:
        change, self._pending = self._pending, CacheChange()
        try:
            await self.apply(change)
        except Exception as exc:
            # Keep it for the next attempt (merged with whatever arrived meanwhile).
            change.merge(self._pending)
            self._pending = change
            self._metrics.cache_pending_tokens.set(len(change.ids))
            if isinstance(exc, RedisError | OSError):
                self._metrics.redis_errors.labels("update").inc()
                self._metrics.redis_up.set(0)
                log.warning("cache update failed; will catch up", exc_info=True)
            else:
                log.exception("cache update failed; will retry")
            return False
        self._metrics.redis_up.set(1)
        self._metrics.cache_pending_tokens.set(len(self._pending.ids))
        return True

    async def run(self) -> None:
        """Apply pending changes until cancelled, backing off while Redis is unavailable."""
        delay = INITIAL_RETRY_SECONDS
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if await self._apply_pending():
                delay = INITIAL_RETRY_SECONDS
                if not self._pending:
                    self._idle.set()
                # Whatever the batches committed meanwhile is brought up to date at once: a
                # token's keys are written once per interval however many samples it got.
                await asyncio.sleep(self._min_interval_seconds)
                continue
            self._wakeup.set()  # still pending: try again after the pause
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_seconds)

    async def drain(self, grace_seconds: float) -> bool:
        """Wait (bounded) until every submitted change reached Redis; used on shutdown."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_seconds):
                await self._idle.wait()
        return self._idle.is_set()
