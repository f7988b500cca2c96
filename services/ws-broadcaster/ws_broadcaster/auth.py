"""Who is connecting: the API key (``X-API-Key`` header or ``api_key`` query parameter)
verified with the gateway's rules by :class:`tokvel_common.keylookup.KeyCache`.

The key is checked (checksum without I/O), looked up by peppered hash in PostgreSQL and kept in
process for ``API_KEY_CACHE_TTL_SECONDS`` (at most 5 s); concurrent connects with one key share
one lookup, so a reconnect storm of thousands of clients costs one query per key. A key change
announced on Redis (revoke, rotate, re-tier) drops the entry at once; a revoked or rotated key's
open connections are closed by the broadcaster.

Failures are :class:`AuthError` with the WebSocket close code to use: 4001 for a missing,
malformed, unknown or revoked key (the reason says which), 1013 (try again later) when
PostgreSQL cannot be reached.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

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
        try:
            verified = await self.keys.verify(raw_key)
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
        )

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        return await self._repository.key_by_hash(key_hash, datetime.now(UTC).date().replace(day=1))
