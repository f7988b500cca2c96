"""Only one replica polls: a lease in Redis, renewed by its holder, taken over when it lapses.

The lease is a key holding the owner's id with a TTL (``SET NX PX``); the holder renews it every
third of the TTL with a compare-and-expire script, and gives it back on shutdown with
compare-and-delete, so a standby takes over at once after a clean stop and at most
``ttl * 4/3`` after a crash. The holder counts the lease from *before* each successful request,
so it believes it holds the lease no longer than Redis does; when Redis cannot be reached the
lease lapses on its own and polling stops until it is renewed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from ingestor.aio import sleep_unless
from ingestor.metrics import IngestorMetrics
from tokvel_common.redis_client import RedisClient

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def lease_key(topic: str) -> str:
    """One lease per raw-quotes topic: the replicas that feed the same topic take turns."""
    return f"tokvel:ingestor:{{{topic}}}:lease"


class RedisLease:
    def __init__(
        self,
        redis: RedisClient,
        key: str,
        owner: str,
        ttl_seconds: float,
        metrics: IngestorMetrics,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._key = key
        self._owner = owner
        self._ttl = ttl_seconds
        self._metrics = metrics
        self._monotonic = monotonic
        self._valid_until = 0.0

    @property
    def held(self) -> bool:
        return self._monotonic() < self._valid_until

    async def run(self, stop: asyncio.Event) -> None:
        """Contend for the lease and keep it until ``stop``; then hand it back."""
        try:
            while True:
                was_held = self.held
                await self._acquire_or_renew()
                if self.held != was_held:
                    log.info(
                        "polling lease " + ("acquired" if self.held else "lost"),
                        extra={"owner": self._owner, "key": self._key},
                    )
                self._metrics.lease_held.set(int(self.held))
                if await sleep_unless(stop, self._ttl / 3):
                    return
        finally:
            await self._release()

    async def wait_held(self, stop: asyncio.Event) -> bool:
        """Until this replica holds the lease (``True``) or a shutdown is asked for (``False``)."""
        while not self.held:
            if await sleep_unless(stop, min(0.2, self._ttl / 10)):
                return False
        return True

    async def _acquire_or_renew(self) -> None:
        started = self._monotonic()
        ttl_ms = str(int(self._ttl * 1000))
        try:
            if self.held:
                ok = await self._redis.eval(_RENEW, 1, self._key, self._owner, ttl_ms)
            else:
                ok = await self._redis.set(self._key, self._owner, nx=True, px=int(ttl_ms))
        except RedisError:
            log.warning("polling lease not renewed: Redis unavailable", exc_info=True)
            return
        self._valid_until = started + self._ttl if ok else 0.0

    async def _release(self) -> None:
        if not self.held:
            return
        self._valid_until = 0.0
        self._metrics.lease_held.set(0)
        try:
            await self._redis.eval(_RELEASE, 1, self._key, self._owner)
        except RedisError:
            log.warning("polling lease not released; it expires by itself", exc_info=True)
