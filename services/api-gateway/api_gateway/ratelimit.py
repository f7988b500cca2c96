"""Per-minute limits shared by every replica through Redis; the monthly quota from :mod:`quota`.

Per minute: a fixed window per calendar minute (UTC), counted in
``rate_limit:{api_key_hash}:{window}`` by one Lua script (INCRBY, and EXPIRE on the window's
first hits: atomic, whatever the number of replicas). A request is refused once the count
passes the tier's per-minute limit; refused requests count too (a client hammering a closed
window keeps it closed until it resets).

Batched, and still exact: the requests that reach the limiter in the same turn of the event
loop are counted together (:class:`HitBatcher`), one ``INCRBY n`` per counter in one round trip
(a pipeline when several counters are hit). Redis applies each INCRBY atomically, so the counter
moves exactly as n INCRs in a row would, and the n requests take the counts ``total - n + 1``
to ``total`` that those INCRs would have answered, one each: every request sees a count no
other request, on this replica or another, sees, and exactly ``limit`` requests per window
pass across all replicas. Batching only changes which of the concurrent requests gets which
count, which concurrency never fixed anyway; a request waits for nothing but its own turn's
round trip.

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

import asyncio
import calendar
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
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

# INCRBY the batch's requests (ARGV[2]) and, when they are the window's first, EXPIRE (ARGV[1]):
# atomic, so a crash between the two can never leave a counter without a TTL.
HIT_SCRIPT: Final = """
local count = redis.call('INCRBY', KEYS[1], ARGV[2])
if count == tonumber(ARGV[2]) then
    redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return count
"""

# Per counter, one slot per request of the batch in arrival order: the future a waiting
# request is answered through, or None for the request that sends the batch.
_Batch = dict[str, list["asyncio.Future[int] | None"]]

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


@dataclass(frozen=True)
class _Month:
    """The calendar month (UTC) that minute ``window`` lies in."""

    window: int
    period: date
    next_start: float  # epoch seconds
    length_s: int


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


class HitBatcher:
    """Counts the hits of one event-loop turn with one INCRBY per counter (see the module doc).

    The first request of a turn sends the batch (so no task is created and every round trip
    has a waiting owner): it yields once, letting the requests of the same turn join, then runs
    the script and answers the others. If it fails or is cancelled, the others get
    :class:`RedisUnavailable` and count locally, as after any Redis failure.
    """

    def __init__(self, gate: RedisGate) -> None:
        self._gate = gate
        self._script = gate.client.register_script(HIT_SCRIPT)
        self._open: _Batch | None = None

    async def hit(self, key: str) -> int:
        """Count one request in ``key``: the count INCR would have answered for it."""
        batch = self._open
        if batch is not None:
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            batch.setdefault(key, []).append(future)
            return await future
        batch = self._open = {key: [None]}
        own = 0
        try:
            await asyncio.sleep(0)  # the other requests of this turn join the batch
            self._open = None
            totals = await self._gate.run("rate_limit", lambda: self._incr(batch))
            for total, waiters in zip(totals, batch.values(), strict=True):
                first = total - len(waiters)
                for position, waiter in enumerate(waiters, start=first + 1):
                    if waiter is None:
                        own = position
                    elif not waiter.done():
                        waiter.set_result(position)
        finally:
            if self._open is batch:
                self._open = None
            for waiters in batch.values():
                for waiter in waiters:
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(RedisUnavailable("the batch was not counted"))
        return own

    async def _incr(self, batch: _Batch) -> list[int]:
        if len(batch) == 1:
            ((key, waiters),) = batch.items()
            return [
                int(await self._script(keys=[key], args=[RATE_LIMIT_TTL_SECONDS, len(waiters)]))
            ]
        # EVAL, not the script's EVALSHA: a cluster pipeline cannot load a missing script.
        pipe = self._gate.client.pipeline(transaction=False)
        for key, waiters in batch.items():
            pipe.eval(HIT_SCRIPT, 1, key, RATE_LIMIT_TTL_SECONDS, len(waiters))
        return [int(count) for count in await pipe.execute()]


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
        self._hits = HitBatcher(gate)
        self._quota = quota
        self._metrics = metrics
        self._local = LocalLimiter()
        self._local_divisor = local_divisor
        self._clock = clock
        self._month = _Month(window=-1, period=date.min, next_start=0.0, length_s=0)

    def drop(self, key_hash: str) -> None:
        self._local.drop(key_hash)

    def reset(self) -> None:
        self._local.reset()

    async def _count(self, principal: Principal, window: int, *, hit: bool) -> tuple[int, Backend]:
        key = rate_limit_key(principal.key_hash, window)
        try:
            if hit:
                return await self._hits.hit(key), "redis"
            count = await self._gate.run("rate_limit_peek", lambda: self._gate.client.get(key))
            return int(count or 0), "redis"
        except RedisUnavailable:
            if hit:
                return self._local.hit(principal.key_hash, window), "local"
            return self._local.peek(principal.key_hash, window), "local"

    def _minute_limit(self, principal: Principal, backend: Backend) -> int:
        limit = principal.limits.per_minute
        return limit if backend == "redis" else max(1, math.ceil(limit / self._local_divisor))

    def _month_of(self, window: int) -> _Month:
        month = self._month
        if month.window != window:
            # A month starts at a minute's start: what holds for a window's first second holds
            # for the whole window.
            now = datetime.fromtimestamp(window * RATE_LIMIT_WINDOW_SECONDS, UTC)
            month = self._month = _Month(
                window=window,
                period=month_start(now),
                next_start=next_month_start(now).timestamp(),
                length_s=calendar.monthrange(now.year, now.month)[1] * 86_400,
            )
        return month

    async def check(self, principal: Principal, *, count: bool = True) -> Decision:
        """Count one request (``count``) or just report the state (``count=False``)."""
        epoch = self._clock()
        window = rate_limit_window(epoch)
        month = self._month_of(window)
        minute_used, backend = await self._count(principal, window, hit=count)
        minute_limit = self._minute_limit(principal, backend)
        period = month.period
        month_used = self._quota.used(principal.key_id, period)
        month_limit = principal.limits.per_month
        reason: Literal["minute", "month"] | None = None
        if count:
            if month_used >= month_limit:
                reason = "month"
            elif minute_used > minute_limit:
                reason = "minute"
            else:
                self._quota.consume(principal.key_id, period, datetime.fromtimestamp(epoch, UTC))
                month_used += 1
            self._metrics.decision(backend, reason or "allowed")
        return Decision(
            allowed=reason is None,
            reason=reason,
            backend=backend,
            minute_limit=minute_limit,
            minute_used=minute_used,
            minute_reset_s=max(1, math.ceil((window + 1) * RATE_LIMIT_WINDOW_SECONDS - epoch)),
            month_limit=month_limit,
            month_used=month_used,
            month_reset_s=max(1, math.ceil(month.next_start - epoch)),
            month_window_s=month.length_s,
        )
