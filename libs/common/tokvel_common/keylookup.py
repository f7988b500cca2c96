"""From an ``X-API-Key`` to its stored record: the rules every authenticating service shares.

A well-formed key (shape and checksum, checked without I/O, see :mod:`tokvel_common.apikeys`)
is hashed with the pepper and looked up by hash (the service's ``fetch``, a query of
:data:`~tokvel_common.apikeys.SELECT_KEY_BY_HASH`). The answer, known key or not, is kept in
process for ``API_KEY_CACHE_TTL_SECONDS`` (at most 5 s), so a busy key costs one query per
instance per TTL, and concurrent requests for a key being looked up share that one lookup (a
reconnect storm of thousands of clients costs one query per key).

Checking the checksum and computing the HMAC cost more than the rest of a cached request, so
the hash of a key found in the store is remembered (key -> hash, bounded, forgotten on
:meth:`KeyCache.reset`): the process holds the keys in use anyway, in every request's headers.

Changes: :meth:`KeyCache.drop` (a :class:`~tokvel_common.apikeys.KeyChange` announcement) forgets
a key at once, :meth:`KeyCache.reset` every key (the subscription was re-established, changes
may have been missed); without them the TTL bounds how long a revoked key or an old tier is
still honoured.

The store down (``fetch`` raises the service's ``unavailable`` exception): a key verified less
than ``stale_seconds`` after its TTL ran out stays usable; anything else re-raises. A key dropped
by an announcement is never served stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

import asyncpg
from pydantic import SecretStr

from tokvel_common.apikeys import ApiKeySettings, hash_key, hashes_match, is_well_formed

MAX_ENTRIES: Final = 10_000

KeyProblem = Literal["missing", "malformed", "unknown", "revoked"]
LookupSource = Literal["memory", "database", "stale"]


@dataclass(frozen=True)
class KeyRecord:
    """A row of :data:`~tokvel_common.apikeys.SELECT_KEY_BY_HASH`."""

    id: int
    key_hash: str
    key_prefix: str
    name: str
    tier: str
    is_active: bool
    month_usage: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> KeyRecord:
        return cls(
            id=row["id"],
            key_hash=row["key_hash"],
            key_prefix=row["key_prefix"],
            name=row["name"],
            tier=row["tier"],
            is_active=row["is_active"],
            month_usage=row["month_usage"],
        )


class KeyRejected(Exception):
    """The key is missing, malformed, unknown or revoked; ``source`` says where a lookup
    answered (None when the key was refused before any lookup)."""

    def __init__(self, problem: KeyProblem, source: LookupSource | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.source = source


@dataclass(frozen=True)
class VerifiedKey:
    key_hash: str
    record: KeyRecord
    source: LookupSource


@dataclass(frozen=True)
class _Entry:
    record: KeyRecord | None
    fetched_at: float


class KeyCache:
    """Verifies keys against ``fetch`` (key hash -> record or None), cached and single-flight."""

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[KeyRecord | None]],
        pepper: SecretStr,
        *,
        ttl_seconds: float,
        unavailable: type[Exception],
        stale_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._pepper = pepper
        self._ttl = ttl_seconds
        self._unavailable = unavailable
        self._stale = stale_seconds
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._hashes: dict[str, str] = {}  # key -> its hash, for keys the store knows
        self._lookups: dict[str, asyncio.Task[KeyRecord | None]] = {}

    @classmethod
    def for_settings(
        cls,
        fetch: Callable[[str], Awaitable[KeyRecord | None]],
        settings: ApiKeySettings,
        *,
        unavailable: type[Exception],
        stale_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> KeyCache:
        """With the pepper and the TTL every service reads from the shared key settings."""
        return cls(
            fetch,
            settings.api_key_pepper,
            ttl_seconds=settings.api_key_cache_ttl_seconds,
            unavailable=unavailable,
            stale_seconds=stale_seconds,
            clock=clock,
        )

    def drop(self, key_hash: str) -> None:
        """Forget one key (it changed): the next request reads it from the store."""
        self._entries.pop(key_hash, None)

    def reset(self) -> None:
        """Forget every key (announcements may have been missed)."""
        self._entries.clear()
        self._hashes.clear()

    async def close(self) -> None:
        """Cancel and await the lookups in flight (their owner is this cache)."""
        tasks = list(self._lookups.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, self._unavailable):
                await task

    async def verify(self, raw_key: str | None) -> VerifiedKey:
        """The key's record; :class:`KeyRejected`, or ``unavailable`` when the store is down."""
        if not raw_key:
            raise KeyRejected("missing")
        key_hash = self._hashes.get(raw_key)
        remembered = key_hash is not None
        if key_hash is None:
            if not is_well_formed(raw_key):
                raise KeyRejected("malformed")
            key_hash = hash_key(raw_key, self._pepper)
        record, source = await self._resolve(key_hash)
        if record is None or not hashes_match(record.key_hash, key_hash):
            raise KeyRejected("unknown", source)
        if not remembered:
            if len(self._hashes) >= MAX_ENTRIES:
                self._hashes.clear()
            self._hashes[raw_key] = key_hash
        if not record.is_active:
            raise KeyRejected("revoked", source)
        return VerifiedKey(key_hash, record, source)

    async def _resolve(self, key_hash: str) -> tuple[KeyRecord | None, LookupSource]:
        entry = self._entries.get(key_hash)
        if entry is not None and self._clock() - entry.fetched_at < self._ttl:
            return entry.record, "memory"
        try:
            return await self._lookup(key_hash), "database"
        except self._unavailable:
            # Re-read: an announcement may have dropped the entry while we waited.
            entry = self._entries.get(key_hash)
            if entry is not None and self._clock() - entry.fetched_at < self._ttl + self._stale:
                return entry.record, "stale"
            raise

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        task = self._lookups.get(key_hash)
        if task is None:
            task = asyncio.create_task(self._fetch_and_keep(key_hash), name="api-key-lookup")
            self._lookups[key_hash] = task
            task.add_done_callback(lambda done: self._lookup_done(key_hash, done))
        # shield: one waiter going away (a client hanging up) must not cancel the others' lookup.
        return await asyncio.shield(task)

    def _lookup_done(self, key_hash: str, task: asyncio.Task[KeyRecord | None]) -> None:
        if self._lookups.get(key_hash) is task:
            del self._lookups[key_hash]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _fetch_and_keep(self, key_hash: str) -> KeyRecord | None:
        fetched_at = self._clock()
        record = await self._fetch(key_hash)
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
