"""Who is calling: the ``X-API-Key`` header resolved to a :class:`Principal` (or 401/403/503).

The key is verified by :class:`tokvel_common.keylookup.KeyCache` (checksum without I/O, a
lookup by peppered hash, kept in process for ``API_KEY_CACHE_TTL_SECONDS``, one lookup at a
time per key, dropped on a key change announcement); each lookup also tells the quota tracker
the key's usage this month.

PostgreSQL down: a key verified less than ``API_KEY_STALE_SECONDS`` ago stays usable (answers
that Redis can give still flow); an unknown or long-unverified key gets 503. A key dropped by an
announcement is never served stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from api_gateway.errors import ApiError, DatabaseUnavailable, database_unavailable
from api_gateway.metrics import GatewayMetrics
from api_gateway.quota import QuotaTracker, month_start
from api_gateway.repository import GatewayRepository
from tokvel_common.apikeys import ApiKeySettings, TierLimits
from tokvel_common.keylookup import KeyCache, KeyProblem, KeyRecord, KeyRejected

API_KEY_HEADER: Final = "X-API-Key"


@dataclass(frozen=True)
class Principal:
    key_id: int
    key_hash: str
    key_prefix: str
    name: str
    tier: str
    limits: TierLimits


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, {"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'})


def _rejection(problem: KeyProblem) -> ApiError:
    if problem == "missing":
        return _unauthorized("missing_api_key", f"send your API key in the {API_KEY_HEADER} header")
    if problem == "revoked":
        return ApiError(403, "api_key_revoked", "this API key has been revoked")
    return _unauthorized("invalid_api_key", "the API key is not valid")


class Authenticator:
    def __init__(
        self,
        repository: GatewayRepository,
        settings: ApiKeySettings,
        quota: QuotaTracker,
        metrics: GatewayMetrics,
        *,
        stale_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repository = repository
        self._settings = settings
        self._quota = quota
        self._metrics = metrics
        self.keys = KeyCache.for_settings(
            self._fetch,
            settings,
            unavailable=DatabaseUnavailable,
            stale_seconds=stale_seconds,
            clock=clock,
        )

    async def authenticate(self, raw_key: str | None) -> Principal:
        try:
            verified = await self.keys.verify(raw_key)
        except KeyRejected as exc:
            if exc.source is not None:
                self._metrics.key_lookup(exc.source, "ok")
            raise _rejection(exc.problem) from None
        except DatabaseUnavailable:
            self._metrics.key_lookup("database", "unavailable")
            self._metrics.db_errors.inc()
            raise database_unavailable() from None
        self._metrics.key_lookup(verified.source, "ok")
        record = verified.record
        return Principal(
            key_id=record.id,
            key_hash=verified.key_hash,
            key_prefix=record.key_prefix,
            name=record.name,
            tier=record.tier,
            limits=self._settings.tier_limits(record.tier),
        )

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        period = month_start(datetime.now(UTC))
        record = await self._repository.key_by_hash(key_hash, period)
        if record is not None:
            self._quota.observe(record.id, period, record.month_usage)
        return record
