"""The instance's rules: what a Kafka record and each client message do to the hub, the resume
buffer, the connections' queues and the Redis registry.

Ordering guarantee per connection and token: ``subscribed``, then the snapshot (or the replayed
updates of a resume), then live updates in seq order. The snapshot lookup is the only await of a
subscribe; the subscription is registered in the hub only after it, in the same synchronous
step that queues the snapshot, so no update can overtake the snapshot and none can fall between
the two. The snapshot's data is the newest (by event time) of what storage holds and what this
instance has read, and its ``seq`` is the last one the instance has read for the token, so
every update that follows it has a greater seq.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final

from tokvel_common.cache import ws_subs_key
from tokvel_common.events import MetricsSample
from tokvel_common.serialization import DecodeError, decode
from ws_broadcaster.auth import CLOSE_UNAUTHORIZED, KeyEnded, Principal
from ws_broadcaster.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_SLOW_CONSUMER,
    Connection,
)
from ws_broadcaster.hub import Hub, Outgoing
from ws_broadcaster.metrics import WsMetrics
from ws_broadcaster.protocol import (
    ClientMessage,
    Error,
    Ping,
    Pong,
    Snapshot,
    SnapshotReason,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Update,
    encode_message,
)
from ws_broadcaster.registry import Registry, RegistryUnavailable, connection_id, conns_key
from ws_broadcaster.repository import DatabaseUnavailable
from ws_broadcaster.resume import ResumeBuffer, make_seq
from ws_broadcaster.snapshots import SnapshotSource, StoredSnapshot

log = logging.getLogger(__name__)

# A resume that turns into a gap while its snapshot lookup runs needs another lookup; after this
# many the snapshot is built from what the instance itself holds.
SNAPSHOT_ATTEMPTS: Final = 3
# The consumer hands records over in batches; fan-out yields to the loop every this many, so
# client handlers and senders run during a large catch-up batch.
YIELD_EVERY_RECORDS: Final = 32
SNAPSHOT_FRAMES_KEPT: Final = 20_000


class Broadcaster:
    def __init__(
        self,
        *,
        instance_id: str,
        metrics: WsMetrics,
        buffer: ResumeBuffer,
        snapshots: SnapshotSource,
        registry: Registry,
        snapshot_timeout: float,
    ) -> None:
        self.instance_id = instance_id
        self.hub: Hub[Connection] = Hub()
        self.buffer = buffer
        self._metrics = metrics
        self._snapshots = snapshots
        self._registry = registry
        self._snapshot_timeout = snapshot_timeout
        self._serial = itertools.count(1)
        # token -> (reason, seq, stored, newest sample, encoded snapshot): see _snapshot_frame.
        self._snapshot_frames: dict[
            int,
            tuple[SnapshotReason, int | None, StoredSnapshot | None, MetricsSample | None, bytes],
        ] = {}
        self._by_key: dict[str, set[Connection]] = {}
        self._drained = asyncio.Event()  # set while no connection is attached
        self._drained.set()
        metrics.connections.set_function(lambda: self.hub.connection_count)
        metrics.subscriptions.set_function(lambda: self.hub.subscription_count)
        metrics.subscribed_tokens.set_function(lambda: self.hub.token_count)
        metrics.resume_buffer_entries.set_function(lambda: self.buffer.entries)

    # ---------------------------------------------------------------------- Kafka side

    def publish_record(
        self, partition: int, offset: int, value: bytes | None, timestamp_ms: int | None
    ) -> None:
        """One record of token.metrics: encoded once, buffered, offered to the subscribers."""
        if value is None:
            self._metrics.records.labels("invalid").inc()
            return
        try:
            sample = decode(value, MetricsSample)
        except DecodeError as exc:
            self._metrics.records.labels("invalid").inc()
            log.warning(
                "skipping an invalid token.metrics record",
                extra={"partition": partition, "offset": offset, "reason": exc.reason},
            )
            return
        seq = make_seq(partition, offset)
        frame = encode_message(Update(token_id=sample.cmc_id, seq=seq, sample=sample))
        self.buffer.record(sample.cmc_id, seq, frame, sample)
        produced_at = timestamp_ms / 1000 if timestamp_ms is not None and timestamp_ms > 0 else None
        item = Outgoing(frame, "update", produced_at)
        for conn in self.hub.publish(sample.cmc_id, seq, item):
            conn.close_soon(CLOSE_SLOW_CONSUMER, "send queue full", "slow_consumer")
        self._metrics.records.labels("published").inc()

    # --------------------------------------------------------------------- connections

    def new_connection_id(self) -> str:
        return connection_id(self.instance_id, next(self._serial))

    async def admit(self, principal: Principal, conn_id: str) -> bool:
        """Count the connection against its key's limit (all instances, via Redis; this
        instance's own count when Redis does not answer)."""
        limit = principal.limits.max_connections
        try:
            return await self._registry.acquire_connection(principal.key_id, conn_id, limit)
        except RegistryUnavailable:
            return len(self._by_key.get(principal.key_hash, ())) < limit

    def attach(self, conn: Connection) -> None:
        self.hub.attach(conn)
        self._drained.clear()
        self._by_key.setdefault(conn.principal.key_hash, set()).add(conn)
        conn.start()

    async def detach(self, conn: Connection) -> None:
        """The handler is done with ``conn``: forget it here and in Redis, await its tasks."""
        tokens = self.hub.detach(conn)
        if not self.hub.connection_count:
            self._drained.set()
        same_key = self._by_key.get(conn.principal.key_hash)
        if same_key is not None:
            same_key.discard(conn)
            if not same_key:
                del self._by_key[conn.principal.key_hash]
        await conn.finish()
        removals: dict[str, list[str]] = {ws_subs_key(t): [conn.id] for t in tokens}
        removals[conns_key(conn.principal.key_id)] = [conn.id]
        await self._registry.remove(removals)

    def close_key(self, key_hash: str, ended: KeyEnded) -> int:
        """Close every connection of a key (revoked or rotated) with 4001; returns how many."""
        conns = list(self._by_key.get(key_hash, ()))
        for conn in conns:
            conn.close_soon(CLOSE_UNAUTHORIZED, f"api key {ended}", "key_revoked", flush=True)
        if conns:
            log.info(
                "closed connections of an ended key",
                extra={"connections": len(conns), "key_ended": ended},
            )
        return len(conns)

    async def recheck_keys(
        self, recheck: Callable[[Principal], Awaitable[KeyEnded | None]]
    ) -> None:
        """Re-verify each key with open connections once (not once per connection) and close
        the connections of those that ended. PostgreSQL down ends the pass and closes nothing:
        these sockets were authenticated, and an outage must not disconnect every client."""
        principals = [next(iter(conns)).principal for conns in self._by_key.values() if conns]
        outcomes = self._metrics.key_rechecks
        for checked, principal in enumerate(principals):
            try:
                ended = await recheck(principal)
            except DatabaseUnavailable:
                outcomes.labels("unavailable").inc(len(principals) - checked)
                log.warning(
                    "api keys of open connections cannot be re-checked now: left open",
                    extra={"keys": len(principals) - checked},
                )
                return
            if ended is None:
                outcomes.labels("valid").inc()
            else:
                outcomes.labels("ended").inc()
                self.close_key(principal.key_hash, ended)

    async def run_key_rechecks(
        self, recheck: Callable[[Principal], Awaitable[KeyEnded | None]], interval: float
    ) -> None:
        """:meth:`recheck_keys` every ``interval`` seconds (the key cache TTL), until cancelled:
        an announcement lost while Redis was down still ends the key's connections."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.recheck_keys(recheck)
            except Exception:
                log.exception("re-checking the api keys of open connections failed")

    async def close_all(self) -> None:
        """Graceful stop: 1001 "going away" to everyone; returns when every handler is done
        (the caller bounds the wait)."""
        conns = self.hub.subscribers()
        for conn in conns:
            conn.close_soon(CLOSE_GOING_AWAY, "going away", "shutdown", flush=True)
        if conns:
            log.info("closing connections", extra={"connections": len(conns)})
            await self._drained.wait()

    def desired_registry(self) -> Mapping[str, Iterable[str]]:
        """What Redis should hold for this instance (for reconciling)."""
        desired: dict[str, list[str]] = {
            ws_subs_key(token_id): [c.id for c in conns]
            for token_id, conns in self.hub.entries().items()
        }
        for conns in self._by_key.values():
            for conn in conns:
                desired.setdefault(conns_key(conn.principal.key_id), []).append(conn.id)
        return desired

    # ------------------------------------------------------------------ client messages

    async def handle(self, conn: Connection, message: ClientMessage) -> None:
        if isinstance(message, Subscribe):
            await self.subscribe(conn, message)
        elif isinstance(message, Unsubscribe):
            await self.unsubscribe(conn, message)
        elif isinstance(message, Ping):
            conn.reply(Pong(id=message.id))

    def error(self, conn: Connection, error: Error) -> None:
        self._metrics.client_errors.labels(error.code).inc()
        conn.reply(error)

    async def subscribe(self, conn: Connection, message: Subscribe) -> None:
        requested = list(dict.fromkeys(message.token_ids))
        since = message.since_seq or {}
        if not since.keys() <= set(requested):
            self.error(
                conn,
                Error(
                    id=message.id,
                    code="invalid_message",
                    message="since_seq: every token in it must also be in token_ids",
                ),
            )
            return
        current = self.hub.tokens_of(conn)
        new = [t for t in requested if t not in current]
        limit = conn.principal.limits.max_subscriptions
        if len(current) + len(new) > limit:
            self.error(
                conn,
                Error(
                    id=message.id,
                    code="too_many_subscriptions",
                    message=f"the {conn.principal.tier} tier allows {limit} tokens per "
                    f"connection; {len(current)} subscribed, {len(new)} more asked for",
                    token_ids=new,
                ),
            )
            return

        def needs_snapshot(token_id: int) -> bool:
            resume_from = since.get(token_id)
            return resume_from is None or self.buffer.since(token_id, resume_from) is None

        # In ws_subs before the client hears "subscribed" (and out again if it is not).
        if new:
            await self._registry.add({ws_subs_key(t): [conn.id] for t in new})
        try:
            stored: dict[int, StoredSnapshot] = {}
            unavailable: set[int] = set()
            for _ in range(SNAPSHOT_ATTEMPTS):
                wanted = [t for t in new if t not in stored and t not in unavailable]
                lookup = [t for t in wanted if needs_snapshot(t)]
                if not lookup:
                    break
                try:
                    async with asyncio.timeout(self._snapshot_timeout):
                        result = await self._snapshots.fetch(lookup)
                except TimeoutError:
                    self._metrics.snapshots.labels("unavailable").inc(len(lookup))
                    unavailable.update(lookup)
                    break
                stored.update(result.found)
                unavailable.update(result.unavailable)
            if conn.closing:
                return  # dropped while we looked
            # ---- from here to the end of the hub registration: no await ----
            self._register(conn, message, requested, new, since, stored, unavailable)
        finally:
            subscribed = self.hub.tokens_of(conn)
            dropped = [t for t in new if t not in subscribed]
            if dropped:
                await self._registry.remove({ws_subs_key(t): [conn.id] for t in dropped})

    def _register(
        self,
        conn: Connection,
        message: Subscribe,
        requested: list[int],
        new: list[int],
        since: Mapping[int, int],
        stored: Mapping[int, StoredSnapshot],
        unavailable: set[int],
    ) -> None:
        follow: list[Outgoing] = []
        resumed: list[int] = []
        failed: list[int] = []
        for token_id in new:
            resume_from = since.get(token_id)
            frames = None if resume_from is None else self.buffer.since(token_id, resume_from)
            if resume_from is not None and frames is not None:
                self._metrics.resumes.labels("replayed").inc()
                self.hub.subscribe(conn, token_id, skip_through=resume_from)
                follow.extend(Outgoing(frame, "replay") for frame in frames)
                resumed.append(token_id)
                continue
            reason: SnapshotReason = "subscribe" if resume_from is None else "resume_gap"
            if resume_from is not None:
                self._metrics.resumes.labels("gap").inc()
            frame = self._snapshot_frame(token_id, reason, stored.get(token_id))
            if frame is None:
                failed.append(token_id)
                continue
            self.hub.subscribe(conn, token_id)
            follow.append(Outgoing(frame, "snapshot"))
        failed_set = set(failed)
        conn.reply(
            Subscribed(
                id=message.id,
                token_ids=[t for t in requested if t not in failed_set],
                resumed=resumed,
            )
        )
        conn.send_all(follow)
        if failed:
            self.error(
                conn,
                Error(
                    id=message.id,
                    code="snapshot_unavailable",
                    message="no snapshot could be read for these tokens (storage unavailable); "
                    "they are not subscribed: retry",
                    token_ids=failed,
                ),
            )

    def _snapshot_frame(
        self, token_id: int, reason: SnapshotReason, stored: StoredSnapshot | None
    ) -> bytes | None:
        """Storage's state merged with the newest sample this instance has read, encoded.

        Encoded once per distinct state: a reconnect storm of thousands of clients subscribing
        to the same tokens (the snapshot source caches its lookups briefly) reuses the bytes.
        """
        newest = self.buffer.newest(token_id)
        if stored is None and newest is None:
            return None  # storage did not answer and the instance knows nothing either
        seq = self.buffer.last_seq(token_id)
        cached = self._snapshot_frames.get(token_id)
        if cached is not None:
            c_reason, c_seq, c_stored, c_newest, frame = cached
            if c_reason == reason and c_seq == seq and c_stored is stored and c_newest is newest:
                return frame
        sample = stored.sample if stored is not None else None
        if newest is not None and (sample is None or newest.ts > sample.ts):
            sample = newest
        frame = encode_message(
            Snapshot(
                token_id=token_id,
                seq=seq,
                reason=reason,
                token=stored.token if stored is not None else None,
                sample=sample,
            )
        )
        if len(self._snapshot_frames) >= SNAPSHOT_FRAMES_KEPT:
            self._snapshot_frames.clear()
        self._snapshot_frames[token_id] = (reason, seq, stored, newest, frame)
        return frame

    async def unsubscribe(self, conn: Connection, message: Unsubscribe) -> None:
        requested = list(dict.fromkeys(message.token_ids))
        removed = [t for t in requested if self.hub.unsubscribe(conn, t)]
        conn.reply(Unsubscribed(id=message.id, token_ids=requested))
        if removed:
            await self._registry.remove({ws_subs_key(t): [conn.id] for t in removed})
