"""Who is calling: the ``X-API-Key`` header resolved to a :class:`Principal` (or 401/403/503).

A well-formed key (shape and checksum, checked without I/O) is hashed with the pepper and looked
up by hash in PostgreSQL; the answer, known key or not, is kept in process for
``API_KEY_CACHE_TTL_SECONDS`` (at most 5 s), so a busy key costs one query per replica per TTL.
Concurrent requests for a key that is being looked up wait for that one lookup.

Changes: a :class:`~tokvel_common.apikeys.KeyChange` announcement drops the key's entry at once
(see :class:`~tokvel_common.apikeys.KeyChangeListener`); without it, the TTL bounds how long a
revoked key or an old tier is still honoured.

PostgreSQL down: a key verified less than ``API_KEY_STALE_SECONDS`` ago stays usable (answers
that Redis can give still flow); an unknown or long-unverified key gets 503. A key dropped by an
announcement is never served stale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from api_gateway.errors import ApiError, DatabaseUnavailable, database_unavailable
from api_gateway.metrics import GatewayMetrics
from api_gateway.quota import QuotaTracker, month_start
from api_gateway.repository import GatewayRepository, KeyRecord
from tokvel_common.apikeys import (
    ApiKeySettings,
    TierLimits,
    hash_key,
    hashes_match,
    is_well_formed,
)

API_KEY_HEADER: Final = "X-API-Key"
MAX_ENTRIES: Final = 10_000


@dataclass(frozen=True)
class Principal:
    key_id: int
    key_hash: str
    key_prefix: str
    name: str
    tier: str
    limits: TierLimits


@dataclass(frozen=True)
class _Entry:
    record: KeyRecord | None
    fetched_at: float


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, {"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'})


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
        self._ttl = settings.api_key_cache_ttl_seconds
        self._stale = stale_seconds
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lookups: dict[str, asyncio.Task[KeyRecord | None]] = {}

    def drop(self, key_hash: str) -> None:
        """Forget one key (it changed): the next request reads it from PostgreSQL."""
        self._entries.pop(key_hash, None)

    def reset(self) -> None:
        """Forget every key (announcements may have been missed)."""
        self._entries.clear()

    async def authenticate(self, raw_key: str | None) -> Principal:
        if not raw_key:
            raise _unauthorized(
                "missing_api_key", f"send your API key in the {API_KEY_HEADER} header"
            )
        if not is_well_formed(raw_key):
            raise _unauthorized("invalid_api_key", "the API key is not valid")
        key_hash = hash_key(raw_key, self._settings.api_key_pepper)
        record = await self._resolve(key_hash)
        if record is None or not hashes_match(record.key_hash, key_hash):
            raise _unauthorized("invalid_api_key", "the API key is not valid")
        if not record.is_active:
            raise ApiError(403, "api_key_revoked", "this API key has been revoked")
        return Principal(
            key_id=record.id,
            key_hash=key_hash,
            key_prefix=record.key_prefix,
            name=record.name,
            tier=record.tier,
            limits=self._settings.tier_limits(record.tier),
        )

    async def _resolve(self, key_hash: str) -> KeyRecord | None:
        now = self._clock()
        entry = self._entries.get(key_hash)
        if entry is not None and now - entry.fetched_at < self._ttl:
            self._metrics.key_lookup("memory", "ok")
            return entry.record
        try:
            record = await self._lookup(key_hash)
        except DatabaseUnavailable:
            # Re-read: an announcement may have dropped the entry while we waited.
            entry = self._entries.get(key_hash)
            if entry is not None and self._clock() - entry.fetched_at < self._ttl + self._stale:
                self._metrics.key_lookups.labels("stale", "ok").inc()
                return entry.record
            self._metrics.key_lookups.labels("database", "unavailable").inc()
            self._metrics.db_errors.inc()
            raise database_unavailable() from None
        self._metrics.key_lookups.labels("database", "ok").inc()
        return record

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        task = self._lookups.get(key_hash)
        if task is None:
            task = asyncio.create_task(self._fetch(key_hash), name="api-key-lookup")
            self._lookups[key_hash] = task
            task.add_done_callback(lambda t: self._lookup_done(key_hash, t))
        # shield: one waiter going away (a client hanging up) must not cancel the others' lookup.
        return await asyncio.shield(task)

    def _lookup_done(self, key_hash: str, task: asyncio.Task[KeyRecord | None]) -> None:
        if self._lookups.get(key_hash) is task:
            del self._lookups[key_hash]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        fetched_at = self._clock()
        period = month_start(datetime.now(UTC))
        record = await self._repository.key_by_hash(key_hash, period)
        if record is not None:
            self._quota.observe(record.id, period, record.month_usage)
        if len(self._entries) >= MAX_ENTRIES:
            self._evict(fetched_at)
        self._entries[key_hash] = _Entry(record, fetched_at)
        return record

    def _evict(self, now: float) -> None:
        horizon = self._ttl + self._stale
        for key_hash, entry in list(self._entries.items()):
            if now - entry.fetched_at >= horizon:
                del self._entries[key_hash]
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
