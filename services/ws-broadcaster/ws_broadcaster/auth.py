"""Who is connecting: the API key (``X-API-Key`` header or ``api_key`` query parameter)
resolved with the gateway's rules, from :mod:`tokvel_common.apikeys`.

A well-formed key (shape and checksum, no I/O) is hashed with the shared pepper and looked up by
hash in PostgreSQL. The answer, known key or not, is kept in process for
``API_KEY_CACHE_TTL_SECONDS`` (at most 5 s) and concurrent connects with one key share one
lookup, so a reconnect storm of thousands of clients costs one query per key. A key change
announced on Redis (revoke, rotate, re-tier) drops the entry at once; a revoked or rotated key's
open connections are closed by the broadcaster.

Failures are :class:`AuthError` with the WebSocket close code to use: 4001 for a missing,
malformed, unknown or revoked key (the reason says which), 1013 (try again later) when
PostgreSQL cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Final

from tokvel_common.apikeys import hash_key, hashes_match, is_well_formed
from ws_broadcaster.repository import DatabaseUnavailable, KeyRecord, WsRepository
from ws_broadcaster.settings import WsSettings, WsTierLimits

API_KEY_HEADER: Final = "X-API-Key"
API_KEY_QUERY: Final = "api_key"
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_TRY_AGAIN_LATER: Final = 1013
MAX_ENTRIES: Final = 10_000


@dataclass(frozen=True)
class Principal:
    key_id: int
    key_hash: str
    key_prefix: str
    tier: str
    limits: WsTierLimits


class AuthError(Exception):
    def __init__(self, close_code: int, reason: str, outcome: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason
        self.outcome = outcome  # the connect metric's label


@dataclass(frozen=True)
class _Entry:
    record: KeyRecord | None
    fetched_at: float


def month_start(now: datetime) -> date:
    return now.date().replace(day=1)


class KeyResolver:
    def __init__(
        self,
        repository: WsRepository,
        settings: WsSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repository = repository
        self._settings = settings
        self._ttl = settings.api_key_cache_ttl_seconds
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lookups: dict[str, asyncio.Task[KeyRecord | None]] = {}

    def drop(self, key_hash: str) -> None:
        self._entries.pop(key_hash, None)

    def reset(self) -> None:
        self._entries.clear()

    async def close(self) -> None:
        """Cancel and await the lookups in flight (their owner is this resolver)."""
        tasks = list(self._lookups.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, DatabaseUnavailable):
                await task

    async def authenticate(self, raw_key: str | None) -> Principal:
        if not raw_key:
            raise AuthError(
                CLOSE_UNAUTHORIZED,
                f"missing api key: send the {API_KEY_HEADER} header or the "
                f"{API_KEY_QUERY} query parameter",
                "unauthorized",
            )
        if not is_well_formed(raw_key):
            raise AuthError(CLOSE_UNAUTHORIZED, "invalid api key", "unauthorized")
        key_hash = hash_key(raw_key, self._settings.api_key_pepper)
        try:
            record = await self._resolve(key_hash)
        except DatabaseUnavailable:
            raise AuthError(
                CLOSE_TRY_AGAIN_LATER, "api keys cannot be checked now", "auth_unavailable"
            ) from None
        if record is None or not hashes_match(record.key_hash, key_hash):
            raise AuthError(CLOSE_UNAUTHORIZED, "invalid api key", "unauthorized")
        if not record.is_active:
            raise AuthError(CLOSE_UNAUTHORIZED, "api key revoked", "unauthorized")
        return Principal(
            key_id=record.id,
            key_hash=key_hash,
            key_prefix=record.key_prefix,
            tier=record.tier,
            limits=self._settings.ws_limits(record.tier),
        )

    async def _resolve(self, key_hash: str) -> KeyRecord | None:
        entry = self._entries.get(key_hash)
        if entry is not None and self._clock() - entry.fetched_at < self._ttl:
            return entry.record
        task = self._lookups.get(key_hash)
        if task is None:
            task = asyncio.create_task(self._fetch(key_hash), name="api-key-lookup")
            self._lookups[key_hash] = task
            task.add_done_callback(lambda done: self._lookup_done(key_hash, done))
        # shield: one client going away must not cancel the lookup the others wait for.
        return await asyncio.shield(task)

    def _lookup_done(self, key_hash: str, task: asyncio.Task[KeyRecord | None]) -> None:
        if self._lookups.get(key_hash) is task:
            del self._lookups[key_hash]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        fetched_at = self._clock()
        record = await self._repository.key_by_hash(key_hash, month_start(datetime.now(UTC)))
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key_hash] = _Entry(record, fetched_at)
        return record
