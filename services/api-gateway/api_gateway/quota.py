"""The monthly quota: durable in PostgreSQL (``rate_limiting``), counted in memory, batched.

Each replica counts the requests it admits per key and month and adds them to
``rate_limiting.usage_count`` (and ``last_used_at``) every ``QUOTA_FLUSH_INTERVAL_SECONDS``, in
one statement for all keys, which answers the new totals (every replica's flushes included).
A key's usage as this replica sees it is the last total it read (key lookups and flushes both
read it) plus what it counted and has not flushed yet. A Redis flush or restart therefore never
resets a quota; PostgreSQL being down only delays the flush (counts are kept and retried).

Precision: other replicas' requests become visible after their next flush and this replica's next
read, so a key may exceed its monthly quota by what the other replicas admit in about one flush
interval plus one key-cache TTL; the per-minute limit (shared through Redis) bounds that to a few
requests.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from api_gateway.errors import DatabaseUnavailable
from api_gateway.metrics import GatewayMetrics
from api_gateway.repository import GatewayRepository

log = logging.getLogger(__name__)

QuotaKey = tuple[int, date]  # (api key id, first day of the month)


def month_start(now: datetime) -> date:
    return date(now.year, now.month, 1)


def next_month_start(now: datetime) -> datetime:
    first = month_start(now)
    following = (first + timedelta(days=32)).replace(day=1)
    return datetime(following.year, following.month, 1, tzinfo=UTC)


@dataclass
class _Pending:
    requests: int
    last_used_at: datetime


class QuotaTracker:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        self._known: dict[QuotaKey, int] = {}
        self._pending: dict[QuotaKey, _Pending] = {}
        self._in_flight: dict[QuotaKey, int] = {}

    def observe(self, key_id: int, period: date, total: int) -> None:
        """A total read from PostgreSQL; totals only grow within a month, so keep the largest."""
        key = (key_id, period)
        self._known[key] = max(self._known.get(key, 0), total)

    def used(self, key_id: int, period: date) -> int:
        key = (key_id, period)
        pending = self._pending.get(key)
        return (
            self._known.get(key, 0)
            + self._in_flight.get(key, 0)
            + (pending.requests if pending else 0)
        )

    def consume(self, key_id: int, period: date, at: datetime) -> None:
        key = (key_id, period)
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = _Pending(1, at)
        else:
            pending.requests += 1
            pending.last_used_at = max(pending.last_used_at, at)
        self._metrics.quota_pending.inc()

    @property
    def pending_requests(self) -> int:
        return sum(p.requests for p in self._pending.values())

    async def flush(self, repository: GatewayRepository) -> bool:
        """Add the pending counts to PostgreSQL; on failure keep them for the next try."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}
        for key, pending in batch.items():
            self._in_flight[key] = self._in_flight.get(key, 0) + pending.requests
        ok = False
        try:
            totals = await repository.flush_usage(
                [(k[0], k[1], p.requests, p.last_used_at) for k, p in batch.items()]
            )
            for key_id, period, total in totals:
                self.observe(key_id, period, total)
            ok = True
        except DatabaseUnavailable:
            log.warning("monthly usage flush failed; will retry", exc_info=True)
            for key, pending in batch.items():
                kept = self._pending.setdefault(key, _Pending(0, pending.last_used_at))
                kept.requests += pending.requests
                kept.last_used_at = max(kept.last_used_at, pending.last_used_at)
        finally:
            for key, pending in batch.items():
                left = self._in_flight.get(key, 0) - pending.requests
                if left > 0:
                    self._in_flight[key] = left
                else:
                    self._in_flight.pop(key, None)
        self._metrics.quota_flushes.labels("ok" if ok else "failed").inc()
        self._metrics.quota_pending.set(self.pending_requests)
        if ok:
            self._forget_old_months()
        return ok

    def _forget_old_months(self) -> None:
        current = month_start(datetime.now(UTC))
        for key in [k for k in self._known if k[1] < current and k not in self._pending]:
            del self._known[key]

    async def run(self, repository: GatewayRepository, interval: float) -> None:
        """Flush every ``interval`` until cancelled (the owner flushes once more at shutdown)."""
        while True:
            await asyncio.sleep(interval)
            await self.flush(repository)
