"""Token metadata from ``/v2/cryptocurrency/info`` onto ``cmc.tokens.info``, refreshed daily.

Metadata barely changes and costs a credit per 100 tokens, so each token is fetched when first
seen and again once its copy is older than the refresh age, never on every poll. When each token
was last fetched is kept in Redis, so a restart or a takeover does not refetch everything.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ingestor.metrics import IngestorMetrics
from ingestor.publisher import Outgoing, Publisher
from tokvel_common.events import TokenInfo
from tokvel_common.redis_client import RedisClient

log = logging.getLogger(__name__)

FetchInfo = Callable[[list[int]], Awaitable[dict[str, Any]]]


def _first_url(urls: Any, name: str, prefer: str | None = None) -> str | None:
    """The first URL CMC lists under ``urls[name]`` (one containing ``prefer`` if any)."""
    listed = urls.get(name) if isinstance(urls, dict) else None
    if not isinstance(listed, list):
        return None
    candidates = [u for u in listed if isinstance(u, str) and u]
    preferred = [u for u in candidates if prefer and prefer in u]
    return next(iter(preferred or candidates), None)


def to_token_info(raw: Any, fetched_at: datetime) -> TokenInfo | None:
    """One ``/v2`` info object as a :class:`TokenInfo`; ``None`` when it is not a usable one."""
    if not isinstance(raw, dict):
        return None
    urls = raw.get("urls")
    try:
        return TokenInfo.model_validate(
            {
                "cmc_id": raw.get("id"),
                "symbol": raw.get("symbol"),
                "name": raw.get("name"),
                "slug": raw.get("slug"),
                "description": raw.get("description"),
                "logo_url": raw.get("logo"),
                "website_url": _first_url(urls, "website"),
                "twitter_url": _first_url(urls, "twitter"),
                "reddit_url": _first_url(urls, "reddit"),
                "github_url": _first_url(urls, "source_code", prefer="github.com"),
                "whitepaper_url": _first_url(urls, "technical_doc"),
                "date_added": raw.get("date_added"),
                "fetched_at": fetched_at,
            }
        )
    except ValidationError:
        return None


class TokenInfoRefresher:
    def __init__(
        self,
        redis: RedisClient,
        publisher: Publisher,
        topic: str,
        metrics: IngestorMetrics,
        *,
        refresh_seconds: float,
        batch_size: int,
    ) -> None:
        self._redis = redis
        self._publisher = publisher
        self._topic = topic
        self._metrics = metrics
        self._refresh = refresh_seconds
        self._batch_size = batch_size
        self._key = f"tokvel:ingestor:{{{topic}}}:info_fetched_at"
        self._fetched_at: dict[int, float] = {}

    async def load(self) -> None:
        stored = await self._redis.hgetall(self._key)
        self._fetched_at = {int(k): float(v) for k, v in stored.items()}

    def due(self, ids: Iterable[int], now: float) -> list[int]:
        """Tokens never fetched, or fetched longer than the refresh age ago, in id order."""
        return sorted(
            {i for i in ids if now - self._fetched_at.get(i, float("-inf")) >= self._refresh}
        )

    async def refresh(self, ids: Iterable[int], fetch: FetchInfo) -> int:
        """Fetch and publish the metadata of the tokens that are due; how many were published.

        CMC errors propagate to the caller, which decides whether to stop, pause or go on; the
        batches done before the error stay done.
        """
        published = 0
        now = datetime.now(UTC)
        due = self.due(ids, now.timestamp())
        for i in range(0, len(due), self._batch_size):
            batch = due[i : i + self._batch_size]
            data = await fetch(batch)
            infos = [to_token_info(data.get(str(cmc_id)), now) for cmc_id in batch]
            messages = [Outgoing(info.cmc_id, info) for info in infos if info is not None]
            in_flight = await self._publisher.send(self._topic, messages)
            report = await self._publisher.deliver(in_flight)
            self._metrics.token_info_published.inc(len(report.delivered))
            published += len(report.delivered)
            if report.undelivered:
                return published  # shutting down; they are due again next time
            # Tokens CMC did not describe are marked too: asking again before the refresh age
            # would only spend credits on the same answer.
            stamps = {cmc_id: now.timestamp() for cmc_id in batch}
            self._fetched_at.update(stamps)
            await self._redis.hset(self._key, mapping={str(k): v for k, v in stamps.items()})
        return published
