"""Reads per token, counted in memory and added to the writer's popularity buckets once a second.

The writer's predictive warming reads ``token_access:{bucket}`` (5-minute buckets, see
:mod:`tokvel_common.cache`). Counting in memory and flushing one pipeline per second (ZINCRBY by
the count, EXPIRE) keeps two Redis commands off every request; the buckets lag by at most a
second, and a replica that dies loses at most its last second of counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from api_gateway.errors import RedisUnavailable
from api_gateway.redis_gate import RedisGate
from tokvel_common.cache import ACCESS_TTL_SECONDS, access_bucket_key

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 1.0
MAX_TRACKED_TOKENS = 100_000  # a bound on memory while Redis is down


class AccessCounter:
    def __init__(self, gate: RedisGate) -> None:
        self._gate = gate
        self._counts: Counter[int] = Counter()

    def record(self, cmc_id: int) -> None:
        if len(self._counts) < MAX_TRACKED_TOKENS or cmc_id in self._counts:
            self._counts[cmc_id] += 1

    async def flush(self) -> None:
        if not self._counts:
            return
        counts, self._counts = self._counts, Counter()
        key = access_bucket_key(time.time())
        pipe = self._gate.client.pipeline(transaction=False)
        for cmc_id, reads in counts.items():
            pipe.zincrby(key, reads, str(cmc_id))
        pipe.expire(key, ACCESS_TTL_SECONDS)
        try:
            await self._gate.run("access_counts", pipe.execute)
        except RedisUnavailable:
            # Popularity is a hint: counts from an outage are not worth keeping.
            return

    async def run(self) -> None:
        """Flush every second until cancelled (the owner flushes once more at shutdown)."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            try:
                await self.flush()
            except Exception:
                log.exception("access counts flush failed")
