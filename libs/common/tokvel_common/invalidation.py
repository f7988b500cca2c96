"""Invalidating in-process caches across instances over Redis pub/sub.

Whoever changes data (the writer) publishes an :class:`Invalidation` on :data:`CHANNEL`; every
instance of every service that keeps an in-process cache runs an :class:`InvalidationListener`
and drops what the message names. Pub/sub delivers at most once: a listener that loses its
connection may have missed messages, so on every (re)subscription it calls ``on_reset``, which
must drop the whole in-process cache. In-process caches still carry a short TTL of their own.

Redis Cluster broadcasts classic pub/sub messages to every node, so the listener subscribes on
one node and moves to another when that one fails; publishing works through any node.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from datetime import date
from typing import Final, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from tokvel_common.redis_client import DEFAULT_SOCKET_TIMEOUT_SECONDS, RedisClient
from tokvel_common.serialization import DecodeError, decode, encode

CHANNEL: Final = "tokvel:invalidate"

log = logging.getLogger(__name__)


class Invalidation(BaseModel):
    """``metrics``: new samples for ``cmc_ids``; ``token_info``: their metadata changed;
    ``partitions``: the daily partitions of token_metrics before ``before`` were dropped."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["metrics", "token_info", "partitions"]
    cmc_ids: list[int] = []
    before: date | None = None


async def publish(client: RedisClient, message: Invalidation) -> None:
    await client.publish(CHANNEL, encode(message))


def _node_url(url: str, host: str, port: int) -> str:
    """``url`` (credentials, TLS scheme, options) pointed at another node."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc, path=""))


class InvalidationListener:
    """Calls ``on_message`` for every invalidation and ``on_reset`` on every (re)subscription."""

    def __init__(
        self,
        client: RedisClient,
        url: str,
        on_message: Callable[[Invalidation], None],
        on_reset: Callable[[], None],
        *,
        retry_seconds: float = 1.0,
    ) -> None:
        self._client = client
        self._url = url
        self._on_message = on_message
        self._on_reset = on_reset
        self._retry_seconds = retry_seconds
        self.subscribed = asyncio.Event()

    def _subscriber_urls(self) -> list[str]:
        if isinstance(self._client, RedisCluster):
            nodes = self._client.get_nodes()
            if nodes:
                return [_node_url(self._url, node.host, int(node.port)) for node in nodes]
        return [self._url]

    async def run(self) -> None:
        """Listen until cancelled, moving to the next node after a failure."""
        for attempt in itertools.count():
            urls = self._subscriber_urls()
            url = urls[attempt % len(urls)]
            try:
                await self._listen(url)
            except (RedisError, OSError):
                log.warning("invalidation listener lost its connection", exc_info=True)
            finally:
                self.subscribed.clear()
            await asyncio.sleep(self._retry_seconds)

    async def _listen(self, url: str) -> None:
        # Its own connection with no read timeout: a quiet channel is not a failure.
        subscriber = Redis.from_url(
            url, socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT_SECONDS, health_check_interval=30
        )
        pubsub = subscriber.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
            self._on_reset()
            self.subscribed.set()
            async for item in pubsub.listen():
                if item.get("type") != "message":
                    continue
                try:
                    message = decode(item["data"], Invalidation)
                except DecodeError:
                    log.warning("ignoring a malformed invalidation", exc_info=True)
                    continue
                self._on_message(message)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            await subscriber.aclose()
