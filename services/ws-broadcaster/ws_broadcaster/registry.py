"""The broadcasters' shared bookkeeping in Redis: subscriber sets, connections per key, liveness.

Keys (``ws_subs:{token_id}`` is ARCHITECTURE.md's, via :func:`tokvel_common.cache.ws_subs_key`;
the others belong to this service):

=================================  =====  ===================================================
key                                TTL    value
=================================  =====  ===================================================
``ws_subs:{token_id}``             none   set of connection ids subscribed to the token
``ws_conns:{api_key_id}``          none   set of connection ids open with the key
``ws_instance:{instance_id}``      yes    heartbeat of a live instance (TTL WS_INSTANCE_TTL)
``ws_instances``                   none   set of instance ids that registered
``ws_instance_keys:{instance_id}`` none   the ws_subs/ws_conns keys holding its entries
=================================  =====  ===================================================

A connection id is ``{instance_id}:{serial}``. Each instance refreshes its heartbeat; every
instance looks for registered instances whose heartbeat expired and sweeps them: for each key in
the dead one's index, ``SSCAN ... MATCH {dead}:*`` and ``SREM`` what it finds (no keyspace
SCAN, nothing blocking: a large set is walked in pages). The index is written before the entry,
so no entry can exist that a sweep would not find.

Redis is bookkeeping here, never on the delivery path: updates reach clients from the local hub
whatever Redis does. A failed write marks the registry dirty and the next heartbeat reconciles
(adds every local entry, removes every stale one of this instance). An instance whose heartbeat
expired while it was alive (a long pause, a Redis restart) re-registers and reconciles too.

Every key holds a single slot's data and no command spans two keys, so this works unchanged on a
Redis Cluster (pipelines without MULTI are split per node by redis-py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import RedisError

from tokvel_common.redis_client import RedisClient
from ws_broadcaster.metrics import WsMetrics

log = logging.getLogger(__name__)

INSTANCES_KEY: Final = "ws_instances"
SSCAN_PAGE: Final = 500
MAX_REQUESTS_PER_PIPELINE: Final = 500
PER_COMMAND_SECONDS: Final = 0.0005
# A key's connection count and the add happen in one step, so two instances admitting the same
# key at once cannot both take the last place. A member already present counts as admitted.
ACQUIRE_SCRIPT: Final = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('SADD', KEYS[1], ARGV[1])
    return 1
end
return 0
"""

REDIS_ERRORS: Final = (RedisError, OSError, TimeoutError)

# The local state the registry must mirror: Redis key -> connection ids.
DesiredState = Callable[[], Mapping[str, Iterable[str]]]


def conns_key(api_key_id: int) -> str:
    return f"ws_conns:{api_key_id}"


def instance_key(instance_id: str) -> str:
    return f"ws_instance:{instance_id}"


def instance_index_key(instance_id: str) -> str:
    return f"ws_instance_keys:{instance_id}"


def connection_id(instance_id: str, serial: int) -> str:
    return f"{instance_id}:{serial}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RegistryUnavailable(Exception):
    """Redis did not answer; the caller falls back to what it knows locally."""


_Command = tuple[str, tuple[Any, ...]]  # a pipeline method and its arguments


@dataclass(slots=True)
class _Request:
    commands: list[_Command]
    future: asyncio.Future[list[Any]]


def _non_empty(members: Mapping[str, Iterable[str]]) -> Iterator[tuple[str, list[str]]]:
    for key, values in members.items():
        batch = list(values)
        if batch:
            yield key, batch


class Registry:
    def __init__(
        self,
        redis: RedisClient,
        instance_id: str,
        *,
        ttl_seconds: float,
        timeout_seconds: float,
        metrics: WsMetrics,
    ) -> None:
        self._redis = redis
        self.instance_id = instance_id
        self._ttl_ms = int(ttl_seconds * 1000)
        self._timeout = timeout_seconds
        self._metrics = metrics
        self._index = instance_index_key(instance_id)
        self.dirty = False
        self.registered = False
        self._closed = False
        self._requests: list[_Request] = []
        self._pending = asyncio.Event()

    def _failed(self, operation: str) -> None:
        self._metrics.redis_errors.labels(operation).inc()
        self.dirty = True
        log.warning("redis registry call failed", extra={"operation": operation}, exc_info=True)

    # ---------------------------------------------------------------------- entries
    #
    # Entry writes are group-committed: callers queue their commands and await them, and one
    # flusher sends whatever has queued up as one pipeline, in order, while the previous one is
    # in flight. A storm of thousands of connects and subscribes costs a few round trips on one
    # Redis connection instead of exhausting the client's connection pool.

    async def add(self, members: Mapping[str, Iterable[str]]) -> None:
        """SADD each member to its key (best effort: a failure is reconciled later)."""
        commands: list[_Command] = []
        if members:
            commands.append(("sadd", (self._index, *members.keys())))
        commands.extend(("sadd", (key, *values)) for key, values in _non_empty(members))
        with contextlib.suppress(RegistryUnavailable):
            await self._submit(commands)

    async def remove(self, members: Mapping[str, Iterable[str]]) -> None:
        commands: list[_Command] = [("srem", (key, *values)) for key, values in _non_empty(members)]
        with contextlib.suppress(RegistryUnavailable):
            await self._submit(commands)

    async def acquire_connection(self, api_key_id: int, member: str, limit: int) -> bool:
        """Count ``member`` among the key's connections if fewer than ``limit`` are open.

        Raises :class:`RegistryUnavailable` when Redis does not answer.
        """
        key = conns_key(api_key_id)
        results = await self._submit(
            [
                ("sadd", (self._index, key)),
                ("eval", (ACQUIRE_SCRIPT, 1, key, member, str(limit))),
            ]
        )
        return bool(results[1])

    async def _submit(self, commands: list[_Command]) -> list[Any]:
        if not commands:
            return []
        if self._closed:
            raise RegistryUnavailable("the registry is stopped")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._requests.append(_Request(commands, future))
        self._pending.set()
        return await future

    async def flush_forever(self) -> None:
        """The flusher: one pipeline at a time, each with everything queued meanwhile."""
        try:
            while True:
                await self._pending.wait()
                self._pending.clear()
                batch, self._requests = self._requests, []
                for start in range(0, len(batch), MAX_REQUESTS_PER_PIPELINE):
                    await self._flush(batch[start : start + MAX_REQUESTS_PER_PIPELINE])
        finally:
            self._closed = True
            for request in self._requests:
                if not request.future.done():
                    request.future.set_exception(RegistryUnavailable("the registry is stopped"))
            self._requests = []

    async def _flush(self, batch: list[_Request]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        commands = 0
        for request in batch:
            for name, args in request.commands:
                getattr(pipe, name)(*args)
                commands += 1
        try:
            # A round trip, plus what a large pipeline takes to pack and parse client-side.
            async with asyncio.timeout(self._timeout * 2 + commands * PER_COMMAND_SECONDS):
                results = await pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as exc:
            self._failed("write")
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(RegistryUnavailable(str(exc)))
            return
        position = 0
        for request in batch:
            mine = results[position : position + len(request.commands)]
            position += len(request.commands)
            errors = [r for r in mine if isinstance(r, Exception)]
            if errors:
                self._metrics.redis_errors.labels("write").inc()
                self.dirty = True
            if request.future.done():
                continue  # its waiter went away; the commands were applied all the same
            if errors:
                request.future.set_exception(RegistryUnavailable(str(errors[0])))
            else:
                request.future.set_result(mine)

    # -------------------------------------------------------------------- liveness

    async def register(self, desired: DesiredState) -> None:
        """Start (or restart) the heartbeat; entries left by an earlier life of this id go."""
        await self.sweep(self.instance_id, keep=desired(), forget=False)
        async with asyncio.timeout(self._timeout):
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(instance_key(self.instance_id), str(time.time()), px=self._ttl_ms)
            pipe.sadd(INSTANCES_KEY, self.instance_id)
            await pipe.execute()
        self.registered = True

    async def heartbeat(self, desired: DesiredState) -> None:
        """Refresh the heartbeat; re-register and reconcile when it had expired or a write
        failed. Raises on Redis errors (the caller retries at the next beat)."""
        async with asyncio.timeout(self._timeout):
            alive = await self._redis.pexpire(instance_key(self.instance_id), self._ttl_ms)
        if not alive:
            log.warning("heartbeat had expired: registering again", extra={"id": self.instance_id})
            self.dirty = True
            await self.register(desired)
        if self.dirty:
            self.dirty = False
            await self.reconcile(desired())

    async def reconcile(self, desired: Mapping[str, Iterable[str]]) -> None:
        """Make Redis hold exactly the local entries of this instance."""
        wanted = {key: set(members) for key, members in desired.items()}
        await self.sweep(self.instance_id, keep=wanted, forget=False)
        pipe = self._redis.pipeline(transaction=False)
        if wanted:
            pipe.sadd(self._index, *wanted.keys())
        for key, members in wanted.items():
            if members:
                pipe.sadd(key, *members)
        async with asyncio.timeout(self._timeout * 4):
            await pipe.execute()

    async def dead_instances(self) -> list[str]:
        async with asyncio.timeout(self._timeout):
            ids = sorted(_text(i) for i in await self._redis.smembers(INSTANCES_KEY))
            others = [i for i in ids if i != self.instance_id]
            if not others:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for other in others:
                pipe.exists(instance_key(other))
            alive = await pipe.execute()
        return [other for other, exists in zip(others, alive, strict=True) if not exists]

    async def sweep(
        self,
        instance_id: str,
        *,
        keep: Mapping[str, Iterable[str]] | None = None,
        forget: bool = True,
    ) -> int:
        """Remove ``instance_id``'s entries (except ``keep``); returns how many went.

        With ``forget`` the instance is also dropped from the instance set and its index
        deleted (it is dead, or starting afresh).
        """
        keep_sets = {key: set(members) for key, members in (keep or {}).items()}
        prefix = f"{instance_id}:"
        removed = 0
        index = instance_index_key(instance_id)
        async with asyncio.timeout(self._timeout * 4):
            keys = [_text(k) for k in await self._redis.smembers(index)]
        for key in keys:
            kept = keep_sets.get(key, set())
            cursor = 0
            while True:
                async with asyncio.timeout(self._timeout):
                    cursor, page = await self._redis.sscan(
                        key, cursor, match=f"{prefix}*", count=SSCAN_PAGE
                    )
                stale = [m for m in (_text(v) for v in page) if m not in kept]
                if stale:
                    async with asyncio.timeout(self._timeout):
                        removed += await self._redis.srem(key, *stale)
                if cursor == 0:
                    break
        if forget:
            async with asyncio.timeout(self._timeout):
                pipe = self._redis.pipeline(transaction=False)
                pipe.delete(index)
                pipe.srem(INSTANCES_KEY, instance_id)
                await pipe.execute()
        return removed

    async def sweep_dead(self) -> list[str]:
        swept = []
        for dead in await self.dead_instances():
            removed = await self.sweep(dead)
            self._metrics.swept_instances.inc()
            log.info("swept a dead instance", extra={"instance": dead, "entries": removed})
            swept.append(dead)
        return swept

    async def deregister(self) -> None:
        """Graceful stop: this instance's entries and heartbeat go now, not at its TTL."""
        await self.sweep(self.instance_id)
        async with asyncio.timeout(self._timeout):
            await self._redis.delete(instance_key(self.instance_id))
        self.registered = False

    # ------------------------------------------------------------------------ loop

    async def run(
        self, desired: DesiredState, heartbeat_seconds: float, sweep_seconds: float
    ) -> None:
        """The flusher, and the heartbeat (every ``heartbeat_seconds``) with the sweep of dead
        instances (every ``sweep_seconds``); until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.flush_forever(), name="ws-registry-flusher")
            tasks.create_task(
                self._beat_forever(desired, heartbeat_seconds, sweep_seconds),
                name="ws-registry-heartbeat",
            )

    async def _beat_forever(
        self, desired: DesiredState, heartbeat_seconds: float, sweep_seconds: float
    ) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            try:
                if self.registered:
                    await self.heartbeat(desired)
                else:
                    await self.register(desired)
            except REDIS_ERRORS:
                self._failed("heartbeat")
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + sweep_seconds
                try:
                    await self.sweep_dead()
                except REDIS_ERRORS:
                    self._failed("sweep")
            await asyncio.sleep(heartbeat_seconds)
