"""Rate-limit headers, the local fallback counters and the monthly quota bookkeeping."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

from prometheus_client import CollectorRegistry

from api_gateway.errors import DatabaseUnavailable
from api_gateway.metrics import GatewayMetrics
from api_gateway.quota import QuotaTracker, month_start, next_month_start
from api_gateway.ratelimit import Decision, LocalLimiter
from api_gateway.repository import GatewayRepository

PERIOD = date(2026, 11, 1)
AT = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def decision(**changes: object) -> Decision:
    values: dict[str, object] = {
        "allowed": True,
        "reason": None,
        "backend": "redis",
        "minute_limit": 60,
        "minute_used": 10,
        "minute_reset_s": 25,
        "month_limit": 1000,
        "month_used": 100,
        "month_reset_s": 500_000,
        "month_window_s": 2_592_000,
    }
    values.update(changes)
    return Decision(**values)  # type: ignore[arg-type]


def test_headers_of_an_allowed_request() -> None:
    headers = decision().headers()
    assert headers["X-RateLimit-Limit"] == "60"
    assert headers["X-RateLimit-Remaining"] == "50"
    assert headers["X-RateLimit-Reset"] == "25"
    assert headers["RateLimit-Policy"] == '"minute";q=60;w=60, "month";q=1000;w=2592000'
    assert headers["RateLimit"] == '"minute";r=50;t=25, "month";r=900;t=500000'
    assert "Retry-After" not in headers


def test_retry_after_follows_the_exhausted_policy() -> None:
    minute = decision(allowed=False, reason="minute", minute_used=61).headers()
    assert minute["Retry-After"] == "25" and minute["X-RateLimit-Remaining"] == "0"
    month = decision(allowed=False, reason="month", month_used=1000).headers()
    assert month["Retry-After"] == "500000"


def test_local_limiter_counts_per_key_and_window() -> None:
    limiter = LocalLimiter()
    assert [limiter.hit("a", 1) for _ in range(3)] == [1, 2, 3]
    assert limiter.hit("b", 1) == 1
    assert limiter.peek("a", 1) == 3
    limiter.drop("a")
    assert limiter.peek("a", 1) == 0
    limiter.hit("b", 1)
    assert limiter.hit("b", 2) == 1, "a new minute starts from zero"


def test_month_boundaries() -> None:
    assert month_start(AT) == PERIOD
    assert next_month_start(AT) == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_month_start(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == datetime(
        2027, 1, 1, tzinfo=UTC
    )


class FakeRepository:
    def __init__(self) -> None:
        self.totals: dict[tuple[int, date], int] = {}
        self.fail = False

    async def flush_usage(
        self, entries: Sequence[tuple[int, date, int, datetime]]
    ) -> list[tuple[int, date, int]]:
        if self.fail:
            raise DatabaseUnavailable("down")
        out = []
        for key_id, period, requests, _ in entries:
            total = self.totals.get((key_id, period), 0) + requests
            self.totals[key_id, period] = total
            out.append((key_id, period, total))
        return out


async def test_quota_counts_flushes_and_keeps_counts_through_failures() -> None:
    quota = QuotaTracker(GatewayMetrics(CollectorRegistry()))
    repository = FakeRepository()
    repo: GatewayRepository = repository  # type: ignore[assignment]  # a duck-typed fake
    quota.observe(7, PERIOD, 40)  # read with the key: other replicas' usage
    for _ in range(3):
        quota.consume(7, PERIOD, AT)
    assert quota.used(7, PERIOD) == 43
    repository.fail = True
    assert not await quota.flush(repo)
    assert quota.used(7, PERIOD) == 43 and quota.pending_requests == 3
    repository.fail = False
    repository.totals[7, PERIOD] = 45  # other replicas flushed 5 meanwhile
    assert await quota.flush(repo)
    assert quota.pending_requests == 0
    assert quota.used(7, PERIOD) == 48
    quota.observe(7, PERIOD, 10)  # an older read never lowers what is known
    assert quota.used(7, PERIOD) == 48
