"""Every Redis round trip of a request goes through here: bounded in time, skipped while failing.

Redis is an accelerator for the gateway, never a dependency of an answer. Each call is bounded
by ``REDIS_TIMEOUT_SECONDS``: the client's connect, send and read timeouts are set to it (see
``tokvel_common.app_resources.redis_client``), so no extra timer per call is needed. A failure
(error or timeout) opens the breaker for ``REDIS_RETRY_SECONDS``, during which calls fail at
once instead of each paying the timeout; the first call after that pause tries Redis again.
Callers catch :class:`~api_gateway.errors.RedisUnavailable` and fall back (PostgreSQL for data,
the local limiter for rate limits).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError

from api_gateway.errors import RedisUnavailable
from api_gateway.metrics import GatewayMetrics
from tokvel_common.redis_client import RedisClient

T = TypeVar("T")

log = logging.getLogger(__name__)


class RedisGate:
    def __init__(
        self,
        client: RedisClient,
        metrics: GatewayMetrics,
        *,
        retry_seconds: float,
    ) -> None:
        self.client = client
        self._metrics = metrics
        self._retry_seconds = retry_seconds
        self._skip_until = 0.0
        self._failing = False

    @property
    def available(self) -> bool:
        """False while the breaker is open (a recent failure)."""
        return time.monotonic() >= self._skip_until

    async def run(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        if not self.available:
            raise RedisUnavailable("skipped after a recent failure")
        try:
            result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self._skip_until = time.monotonic() + self._retry_seconds
            self._metrics.redis_errors.labels(operation).inc()
            self._metrics.redis_up.set(0)
            if not self._failing:
                log.warning(
                    "redis unavailable; serving without it",
                    extra={"operation": operation, "error": type(exc).__name__},
                )
            self._failing = True
            raise RedisUnavailable(str(exc)) from exc
        if self._failing:
            log.info("redis available again")
            self._failing = False
        self._metrics.redis_up.set(1)
        return result
