"""Per-minute limits shared by every replica through Redis; the monthly quota from :mod:`quota`.

Per minute: a fixed window per calendar minute (UTC), counted in
``rate_limit:{api_key_hash}:{window}`` by one Lua script (INCR, and EXPIRE on the first hit:
atomic, one round trip, whatever the number of replicas). A request is refused once the count
passes the tier's per-minute limit; refused requests count too (a client hammering a closed
window keeps it closed until it resets).

Redis down or slow (see :mod:`redis_gate`): each replica counts on its own, in memory, with the
limit divided by ``RATE_LIMIT_LOCAL_DIVISOR`` (set it to the number of replicas to keep the
global rate at the limit; at the default of 1 a key may get up to replicas x limit per minute
while Redis is down). The limiter never fails open: there is always a counter in force, and the
monthly quota does not depend on Redis at all.

Headers on every authenticated answer: ``X-RateLimit-Limit/Remaining/Reset`` (the minute
window; Reset in seconds), and the IETF fields of draft-ietf-httpapi-ratelimit-headers
(``RateLimit-Policy`` and ``RateLimit``, both with the "minute" and "month" policies);
``Retry-After`` on 429.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from api_gateway.auth import Principal
from api_gateway.errors import RedisUnavailable
from api_gateway.metrics import GatewayMetrics
from api_gateway.quota import QuotaTracker, month_start, next_month_start
from api_gateway.redis_gate import RedisGate
from tokvel_common.apikeys import (
    RATE_LIMIT_TTL_SECONDS,
    RATE_LIMIT_WINDOW_SECONDS,
    rate_limit_key,
    rate_limit_window,
)

# INCR and, on the window's first request, EXPIRE: atomic, so a crash between the two can
# never leave a counter without a TTL.
HIT_SCRIPT: Final = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
    redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return count
"""

Backend = Literal["redis", "local"]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: Literal["minute", "month"] | None
    backend: Backend
    minute_limit: int
    minute_used: int
    minute_reset_s: int
    month_limit: int
    month_used: int
    month_reset_s: int
    month_window_s: int

    @property
    def minute_remaining(self) -> int:
        return max(0, self.minute_limit - self.minute_used)

    @property
    def month_remaining(self) -> int:
        return max(0, self.month_limit - self.month_used)

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.minute_limit),
            "X-RateLimit-Remaining": str(self.minute_remaining),
            "X-RateLimit-Reset": str(self.minute_reset_s),
            "RateLimit-Policy": (
                f'"minute";q={self.minute_limit};w={RATE_LIMIT_WINDOW_SECONDS}, '
                f'"month";q={self.month_limit};w={self.month_window_s}'
            ),
            "RateLimit": (
                f'"minute";r={self.minute_remaining};t={self.minute_reset_s}, '
                f'"month";r={self.month_remaining};t={self.month_reset_s}'
            ),
        }
        if not self.allowed:
            retry = self.month_reset_s if self.reason == "month" else self.minute_reset_s
            headers["Retry-After"] = str(retry)
        return headers


class LocalLimiter:
    """This replica's own per-minute counters, used while Redis is unavailable."""

    def __init__(self) -> None:
        self._window = -1
        self._counts: dict[str, int] = {}

    def _roll(self, window: int) -> None:
        if window != self._window:
            self._window = window
            self._counts.clear()

    def hit(self, key_hash: str, window: int) -> int:
        self._roll(window)
        count = self._counts.get(key_hash, 0) + 1
        self._counts[key_hash] = count
        return count

    def peek(self, key_hash: str, window: int) -> int:
        self._roll(window)
        return self._counts.get(key_hash, 0)

    def drop(self, key_hash: str) -> None:
        self._counts.pop(key_hash, None)

    def reset(self) -> None:
        self._counts.clear()


class RateLimiter:
    def __init__(
        self,
        gate: RedisGate,
        quota: QuotaTracker,
        metrics: GatewayMetrics,
        *,
        local_divisor: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._gate = gate
        self._script = gate.client.register_script(HIT_SCRIPT)
        self._quota = quota
        self._metrics = metrics
        self._local = LocalLimiter()
        self._local_divisor = local_divisor
        self._clock = clock

    def drop(self, key_hash: str) -> None:
        self._local.drop(key_hash)

    def reset(self) -> None:
        self._local.reset()

    async def _count(self, principal: Principal, window: int, *, hit: bool) -> tuple[int, Backend]:
        key = rate_limit_key(principal.key_hash, window)
        try:
            if hit:
                count = await self._gate.run(
                    "rate_limit", lambda: self._script(keys=[key], args=[RATE_LIMIT_TTL_SECONDS])
                )
            else:
                count = await self._gate.run("rate_limit_peek", lambda: self._gate.client.get(key))
            return int(count or 0), "redis"
        except RedisUnavailable:
            if hit:
                return self._local.hit(principal.key_hash, window), "local"
            return self._local.peek(principal.key_hash, window), "local"

    def _minute_limit(self, principal: Principal, backend: Backend) -> int:
        limit = principal.limits.per_minute
        return limit if backend == "redis" else max(1, math.ceil(limit / self._local_divisor))

    async def check(self, principal: Principal, *, count: bool = True) -> Decision:
        """Count one request (``count``) or just report the state (``count=False``)."""
        epoch = self._clock()
        now = datetime.fromtimestamp(epoch, UTC)
        window = rate_limit_window(epoch)
        minute_used, backend = await self._count(principal, window, hit=count)
        minute_limit = self._minute_limit(principal, backend)
        period = month_start(now)
        month_used = self._quota.used(principal.key_id, period)
        month_limit = principal.limits.per_month
        reason: Literal["minute", "month"] | None = None
        if count:
            if month_used >= month_limit:
                reason = "month"
            elif minute_used > minute_limit:
                reason = "minute"
            else:
                self._quota.consume(principal.key_id, period, now)
                month_used += 1
            self._metrics.decision(backend, reason or "allowed")
        next_month = next_month_start(now)
        return Decision(
            allowed=reason is None,
            reason=reason,
            backend=backend,
            minute_limit=minute_limit,
            minute_used=minute_used,
            minute_reset_s=max(1, math.ceil((window + 1) * RATE_LIMIT_WINDOW_SECONDS - epoch)),
            month_limit=month_limit,
            month_used=month_used,
            month_reset_s=max(1, math.ceil(next_month.timestamp() - epoch)),
            month_window_s=calendar.monthrange(now.year, now.month)[1] * 86_400,
        )
