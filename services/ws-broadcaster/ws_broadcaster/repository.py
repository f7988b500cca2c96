"""Every SQL statement of the broadcaster (named constants, ``$n`` parameters) and the calls.

Key lookups use :data:`tokvel_common.apikeys.SELECT_KEY_BY_HASH`, shared with the gateway.
Any failure to reach PostgreSQL, or an answer slower than ``WS_DB_TIMEOUT_SECONDS``, becomes
:class:`DatabaseUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Final

import asyncpg

from tokvel_common.apikeys import SELECT_KEY_BY_HASH
from tokvel_common.cache import TokenMetadata
from tokvel_common.events import MetricsSample
from tokvel_common.keylookup import KeyRecord

PING: Final = "SELECT 1"

# Metadata and newest sample of each token asked for: one index probe per id on tokens.cmc_id
# and on token_latest's primary key. `sample` is the token.metrics message as the writer stored it.
SELECT_SNAPSHOTS: Final = """
SELECT t.cmc_id, t.symbol, t.name, t.slug, t.cmc_rank, t.description, t.logo_url,
       t.website_url, t.twitter_url, t.reddit_url, t.github_url, t.whitepaper_url, t.date_added,
       t.is_active, t.updated_at, l.sample
FROM tokens t
LEFT JOIN token_latest l ON l.token_id = t.id
WHERE t.cmc_id = ANY($1::bigint[])
"""

UNAVAILABLE_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection the server killed, met mid-query
)

_METADATA_FIELDS: Final = tuple(TokenMetadata.model_fields)


class DatabaseUnavailable(Exception):
    pass


@dataclass(frozen=True)
class StoredToken:
    token: TokenMetadata
    sample: MetricsSample | None


class WsRepository:
    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        try:
            async with asyncio.timeout(self._timeout), self._pool.acquire() as conn:
                rows: list[asyncpg.Record] = await conn.fetch(query, *args)
                return rows
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc

    async def ping(self) -> bool:
        return bool(await self._fetch(PING))

    async def key_by_hash(self, key_hash: str, period_start: date) -> KeyRecord | None:
        rows = await self._fetch(SELECT_KEY_BY_HASH, key_hash, period_start)
        return KeyRecord.from_row(rows[0]) if rows else None

    async def snapshots(self, cmc_ids: Sequence[int]) -> dict[int, StoredToken]:
        """The tokens among ``cmc_ids`` that PostgreSQL knows, with their newest sample."""
        rows = await self._fetch(SELECT_SNAPSHOTS, list(cmc_ids))
        found: dict[int, StoredToken] = {}
        for row in rows:
            metadata = TokenMetadata.model_validate({f: row[f] for f in _METADATA_FIELDS})
            sample = (
                MetricsSample.model_validate_json(row["sample"])
                if row["sample"] is not None
                else None
            )
            found[metadata.cmc_id] = StoredToken(metadata, sample)
        return found
