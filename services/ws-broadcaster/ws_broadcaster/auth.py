"""Who is connecting: the API key (``X-API-Key`` header or ``api_key`` query parameter)
verified with the gateway's rules by :class:`tokvel_common.keylookup.KeyCache`.

The key is checked (checksum without I/O), looked up by peppered hash in PostgreSQL and kept in
process for ``API_KEY_CACHE_TTL_SECONDS`` (at most 5 s); concurrent connects with one key share
one lookup, so a reconnect storm of thousands of clients costs one query per key. A key change
announced on Redis (revoke, rotate, re-tier) drops the entry at once; a revoked or rotated key's
open connections are closed by the broadcaster. The announcement can be lost (Redis down at that
moment), so the broadcaster also re-verifies the keys of its open connections every TTL
(:meth:`KeyResolver.recheck`, one lookup per key through the same cache): a key found revoked
or gone closes its connections as its announcement would have; PostgreSQL down leaves them open
(they were authenticated; new connections are the ones refused).

Failures are :class:`AuthError` with the WebSocket close code to use: 4001 for a missing,
malformed, unknown or revoked key (the reason says which), 1013 (try again later) when
PostgreSQL cannot be reached.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

from tokvel_common.keylookup import KeyCache, KeyProblem, KeyRecord, KeyRejected
from ws_broadcaster.repository import DatabaseUnavailable, WsRepository
from ws_broadcaster.settings import WsSettings, WsTierLimits

API_KEY_HEADER: Final = "X-API-Key"
API_KEY_QUERY: Final = "api_key"
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_TRY_AGAIN_LATER: Final = 1013

_REASONS: Final[dict[KeyProblem, str]] = {
    "missing": f"missing api key: send the {API_KEY_HEADER} header or the {API_KEY_QUERY} "
    "query parameter",
    "malformed": "invalid api key",
    "unknown": "invalid api key",
    "revoked": "api key revoked",
}

# Why a key's open connections are closed: the announced change, or what a re-check found.
KeyEnded = Literal["revoked", "rotated"]


@dataclass(frozen=True)
class Principal:
    key_id: int
    key_hash: str
    key_prefix: str
    tier: str
    limits: WsTierLimits
    # Kept to re-verify the key while the connection is open (the key cache holds the keys in
    # use anyway); never printed.
    api_key: str = field(repr=False)


class AuthError(Exception):
    def __init__(self, close_code: int, reason: str, outcome: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason
        self.outcome = outcome  # the connect metric's label


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
        self.keys = KeyCache.for_settings(
            self._fetch, settings, unavailable=DatabaseUnavailable, clock=clock
        )

    async def authenticate(self, raw_key: str | None) -> Principal:
        api_key = raw_key or ""  # empty: refused as missing
        try:
            verified = await self.keys.verify(api_key)
        except KeyRejected as exc:
            raise AuthError(CLOSE_UNAUTHORIZED, _REASONS[exc.problem], "unauthorized") from None
        except DatabaseUnavailable:
            raise AuthError(
                CLOSE_TRY_AGAIN_LATER, "api keys cannot be checked now", "auth_unavailable"
            ) from None
        record = verified.record
        return Principal(
            key_id=record.id,
            key_hash=verified.key_hash,
            key_prefix=record.key_prefix,
            tier=record.tier,
            limits=self._settings.ws_limits(record.tier),
            api_key=api_key,
        )

    async def recheck(self, principal: Principal) -> KeyEnded | None:
        """Whether an authenticated key still holds: None if it does, else why it ended.

        The same verification as a connect (within the cache TTL an answer from memory);
        raises :class:`DatabaseUnavailable` when PostgreSQL cannot say.
        """
        try:
            await self.keys.verify(principal.api_key)
        except KeyRejected as exc:
            # A key that authenticated can only be revoked, or unknown: its hash is the old
            # one of a rotated key.
            return "revoked" if exc.problem == "revoked" else "rotated"
        return None

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        return await self._repository.key_by_hash(key_hash, datetime.now(UTC).date().replace(day=1))
