"""Invalidating in-process caches across instances over Redis pub/sub.

Whoever changes data (the writer) publishes an :class:`Invalidation` on :data:`CHANNEL`; every
instance of every service that keeps an in-process cache runs an :class:`InvalidationListener`
and drops what the message names. Pub/sub delivers at most once: a listener that loses its
connection may have missed messages, so on every (re)subscription it calls ``on_reset``, which
must drop the whole in-process cache. In-process caches still carry a short TTL of their own.
Owners stop a listener with ``stop()`` before cancelling it (see :mod:`tokvel_common.pubsub`).

Redis Cluster broadcasts classic pub/sub messages to every node, so the listener subscribes on
one node and moves to another when that one fails; publishing works through any node.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Final, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict
from redis.asyncio.cluster import RedisCluster

from tokvel_common.pubsub import ChannelListener
from tokvel_common.redis_client import RedisClient
from tokvel_common.serialization import encode

CHANNEL: Final = "tokvel:invalidate"


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


class InvalidationListener(ChannelListener[Invalidation]):
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
        super().__init__(CHANNEL, Invalidation, on_message, on_reset, retry_seconds=retry_seconds)
        self._client = client
        self._url = url

    def subscriber_urls(self) -> list[str]:
        if isinstance(self._client, RedisCluster):
            nodes = self._client.get_nodes()
            if nodes:
                return [_node_url(self._url, node.host, int(node.port)) for node in nodes]
        return [self._url]
