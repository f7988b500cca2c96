"""An in-process copy of the rendered token and velocity answers, in front of Redis.

Why: a cached ``GET /v1/tokens/{id}`` otherwise costs a Redis round trip, decoding the value and
rendering the answer, on every request, although a token changes once per poll. Here the
``data`` member of the answer is kept as the JSON bytes it is sent as; a hit costs a dict lookup.

Never staler than Redis by more than the writer's announcement takes to arrive:

- The writer SETs the new values in Redis, *then* publishes an
  :class:`~tokvel_common.invalidation.Invalidation` naming the tokens; every replica's
  :class:`~tokvel_common.invalidation.InvalidationListener` drops their entries on receipt.
- An entry is only used while the listener is subscribed (:meth:`LocalCache.attach`), and not
  while requests find Redis failing (the reader checks the Redis gate): every (re)subscription
  drops everything (pub/sub may have lost messages meanwhile).
- A fill races an announcement: the Redis GET may answer the old value while the announcement
  is processed. Each fill carries the :attr:`LocalCache.generation` read before its GET and is
  kept only if no announcement arrived since.
- Each entry also expires after ``LOCAL_CACHE_SECONDS`` (at most 5, default 1): the bound when
  an announcement is lost on a connection that has not noticed it is dead yet.

Only answers read from Redis are kept (a PostgreSQL answer fills Redis, the next read keeps it),
so ``meta.source`` stays ``cache`` for every answer served from here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, TypeAdapter

from tokvel_common.invalidation import Invalidation

MAX_ENTRIES: Final = 20_000  # two answers per token: far above the listed tokens

AnswerKind = Literal["token", "velocity"]

_AS_OF: Final = TypeAdapter(datetime | None)  # serialized as Meta.as_of is


@dataclass(frozen=True)
class Rendered:
    """An answer's ``data`` member as sent, and the event time its ``meta`` reports (also as
    sent: only ``meta.age_s`` changes from one request to the next)."""

    data_json: bytes
    as_of: datetime | None
    as_of_json: bytes

    @classmethod
    def of(cls, data: BaseModel, as_of: datetime | None) -> Rendered:
        return cls(data.model_dump_json(by_alias=True).encode(), as_of, _AS_OF.dump_json(as_of))


@dataclass(frozen=True)
class _Entry:
    rendered: Rendered
    stored_at: float


class LocalCache:
    def __init__(self, ttl_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[tuple[AnswerKind, int], _Entry] = {}
        self._live: asyncio.Event | None = None
        self.generation = 0

    @property
    def enabled(self) -> bool:
        """Serving and filling: a TTL, and a subscription that announcements reach us by."""
        return self._ttl > 0 and self._live is not None and self._live.is_set()

    def attach(self, subscribed: asyncio.Event) -> None:
        """Follow the invalidation listener: entries are used only while ``subscribed`` is set."""
        self._live = subscribed

    def get(self, kind: AnswerKind, cmc_id: int) -> Rendered | None:
        if not self.enabled:
            return None
        entry = self._entries.get((kind, cmc_id))
        if entry is None:
            return None
        if self._clock() - entry.stored_at >= self._ttl:
            del self._entries[(kind, cmc_id)]
            return None
        return entry.rendered

    def put(self, kind: AnswerKind, cmc_id: int, rendered: Rendered, generation: int) -> None:
        """Keep ``rendered``, read from Redis after :attr:`generation` was ``generation``."""
        if generation != self.generation or not self.enabled:
            return  # an announcement arrived meanwhile: the value read may be the old one
        now = self._clock()
        if len(self._entries) >= MAX_ENTRIES:
            self._evict(now)
        self._entries[(kind, cmc_id)] = _Entry(rendered, now)

    def invalidate(self, message: Invalidation) -> None:
        """The writer changed these tokens (new samples or metadata)."""
        self.generation += 1
        for cmc_id in message.cmc_ids:
            self._entries.pop(("token", cmc_id), None)
            self._entries.pop(("velocity", cmc_id), None)

    def reset(self) -> None:
        """Forget everything (a new subscription: announcements may have been missed)."""
        self.generation += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self, now: float) -> None:
        for key, entry in list(self._entries.items()):
            if now - entry.stored_at >= self._ttl:
                del self._entries[key]
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
