"""Listening to a Redis pub/sub channel of announcements that drop in-process state.

Both announcement channels (API key changes, cache invalidations) are listened to the same way:
a connection of the listener's own with no read timeout (a quiet channel is no failure), each
message decoded as a pydantic model, and ``on_reset`` called on every (re)subscription, because
pub/sub delivers at most once and a listener that lost its connection may have missed messages.
Its health check runs while the channel is quiet, so a dead server is noticed within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokvel_common.redis_client import DEFAULT_SOCKET_TIMEOUT_SECONDS
from tokvel_common.serialization import DecodeError, decode

log = logging.getLogger(__name__)

MessageT = TypeVar("MessageT", bound=BaseModel)

HEALTH_CHECK_SECONDS = 5
POLL_SECONDS = 1.0


class ChannelListener(Generic[MessageT]):
    """Calls ``on_message`` for each message of ``channel`` and ``on_reset`` on every
    (re)subscription, until :meth:`stop` (or cancellation)."""

    def __init__(
        self,
        channel: str,
        model: type[MessageT],
        on_message: Callable[[MessageT], None],
        on_reset: Callable[[], None],
        *,
        retry_seconds: float = 1.0,
    ) -> None:
        self._channel = channel
        self._model = model
        self._on_message = on_message
        self._on_reset = on_reset
        self._retry_seconds = retry_seconds
        self.subscribed = asyncio.Event()
        self._stopping = asyncio.Event()

    def subscriber_urls(self) -> list[str]:
        """Where to subscribe, tried in turn after failures."""
        raise NotImplementedError

    def stop(self) -> None:
        """Ask :meth:`run` to return (within about a second).

        Owners call this before cancelling: redis-py's pub/sub reads can absorb a cancellation
        that lands at the wrong moment, so a loop relying on cancellation alone may never end.
        """
        self._stopping.set()

    async def run(self) -> None:
        for attempt in itertools.count():
            if self._stopping.is_set():
                return
            urls = self.subscriber_urls()
            try:
                await self._listen(urls[attempt % len(urls)])
            except (RedisError, OSError):
                log.warning("lost the connection to %s", self._channel, exc_info=True)
            finally:
                self.subscribed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._retry_seconds)

    async def _listen(self, url: str) -> None:
        subscriber = Redis.from_url(
            url,
            socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT_SECONDS,
            health_check_interval=HEALTH_CHECK_SECONDS,
        )
        pubsub = subscriber.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            self._on_reset()
            self.subscribed.set()
            while not self._stopping.is_set():
                # get_message with a timeout (not listen()): the stop flag is seen, and the
                # connection's health check runs, while the channel is quiet.
                item = await pubsub.get_message(timeout=POLL_SECONDS)
                if item is None or item.get("type") != "message":
                    continue
                try:
                    message = decode(item["data"], self._model)
                except DecodeError:
                    log.warning("ignoring a malformed message on %s", self._channel, exc_info=True)
                    continue
                self._on_message(message)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            with contextlib.suppress(RedisError, OSError):
                await subscriber.aclose()
