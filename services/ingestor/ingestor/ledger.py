"""Dedupe of ``(cmc_id, last_updated)``: what has been published, surviving restarts.

CMC refreshes some tokens less often than we poll, so most polls return entries already on
``cmc.quotes.raw``. The ledger keeps, per token, the newest event time published and lets
through only entries newer than it. ``listings/latest`` only moves forward, so an older
``last_updated`` is a CMC regression: it is counted and not published (publishing it would make
the token flap between two samples). Memory is one integer per token, whatever the poll rate.

Durability: the ledger lives in a Redis hash together with a **watermark**, the next offset of
each partition after the messages the hash covers. Deliveries are written to Redis after Kafka
acknowledged them, so a crash can leave published messages the hash does not know yet; they are
exactly the messages after the watermark, and :func:`recover` reads them back from the topic
before the first poll. Without any state (a new Redis) the topic is read back over a lookback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import RecordMetadata
from redis.exceptions import RedisError

from ingestor.metrics import IngestorMetrics
from tokvel_common.events import CmcListingEntry, RawQuote
from tokvel_common.kafka import create_consumer
from tokvel_common.redis_client import RedisClient
from tokvel_common.serialization import DecodeError, decode

log = logging.getLogger(__name__)

Verdict = Literal["new", "already_published", "older_than_published"]
PublishedKey = tuple[int, int | None]  # (cmc_id, event time in microseconds)


def to_micros(value: datetime) -> int:
    return round(value.timestamp() * 1_000_000)


def published_key(entry: CmcListingEntry) -> PublishedKey:
    event_time = entry.event_time()
    return entry.id, None if event_time is None else to_micros(event_time)


@dataclass
class Ledger:
    """The newest published event time per token, plus what Redis does not have yet."""

    newest: dict[int, int] = field(default_factory=dict)
    watermarks: dict[int, int] = field(default_factory=dict)
    _dirty: dict[int, int] = field(default_factory=dict)
    _dirty_watermarks: bool = False

    def claim(self, entry: CmcListingEntry) -> Verdict:
        """Whether ``entry`` is to be published; a ``new`` one counts as published from now on.

        An entry without any ``last_updated`` cannot be deduplicated and is always ``new``.
        """
        cmc_id, micros = published_key(entry)
        if micros is None:
            return "new"
        known = self.newest.get(cmc_id)
        if known is not None and micros <= known:
            return "already_published" if micros == known else "older_than_published"
        self.newest[cmc_id] = micros
        return "new"

    def merge(self, keys: Iterable[PublishedKey]) -> None:
        """Learn keys published elsewhere (read back from the topic)."""
        for cmc_id, micros in keys:
            known = self.newest.get(cmc_id)
            if micros is not None and (known is None or micros > known):
                self.newest[cmc_id] = micros
                self._dirty[cmc_id] = micros

    def delivered(
        self, entries: Sequence[CmcListingEntry], metadata: Sequence[RecordMetadata]
    ) -> None:
        """Record acknowledged deliveries: their keys and how far each partition now goes."""
        for entry, meta in zip(entries, metadata, strict=True):
            cmc_id, micros = published_key(entry)
            if micros is not None:
                self._dirty[cmc_id] = max(micros, self._dirty.get(cmc_id, micros))
            self.advance_watermark(meta.partition, meta.offset + 1)

    def advance_watermark(self, partition: int, offset: int) -> None:
        if offset > self.watermarks.get(partition, -1):
            self.watermarks[partition] = offset
            self._dirty_watermarks = True

    def pending(self) -> tuple[dict[int, int], dict[int, int]] | None:
        if not self._dirty and not self._dirty_watermarks:
            return None
        return dict(self._dirty), dict(self.watermarks)

    def saved(self, entries: dict[int, int]) -> None:
        for cmc_id, micros in entries.items():
            if self._dirty.get(cmc_id) == micros:
                del self._dirty[cmc_id]
        self._dirty_watermarks = False


class LedgerStore:
    """The ledger in Redis: a hash of newest event times and a hash of watermarks.

    Both keys share a hash tag, so a Redis Cluster keeps them in one slot and the write of the
    two stays one transaction.
    """

    def __init__(self, redis: RedisClient, topic: str) -> None:
        self._redis = redis
        self.published_key = f"tokvel:ingestor:{{{topic}}}:published"
        self.watermark_key = f"tokvel:ingestor:{{{topic}}}:watermark"

    async def load(self) -> Ledger:
        published = await self._redis.hgetall(self.published_key)
        watermarks = await self._redis.hgetall(self.watermark_key)
        return Ledger(
            newest={int(k): int(v) for k, v in published.items()},
            watermarks={int(k): int(v) for k, v in watermarks.items()},
        )

    async def save(self, ledger: Ledger, metrics: IngestorMetrics) -> None:
        """Write what the ledger learnt since the last save; on failure it is kept for the next."""
        pending = ledger.pending()
        if pending is None:
            return
        entries, watermarks = pending
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                writes = ((self.published_key, entries), (self.watermark_key, watermarks))
                for key, values in writes:
                    if values:
                        pipe.hset(key, mapping={str(k): v for k, v in values.items()})
                await pipe.execute()
        except RedisError:
            metrics.dedupe_state_errors.inc()
            log.warning("dedupe state not saved to Redis; kept for the next save", exc_info=True)
            return
        ledger.saved(entries)


async def topic_partitions(bootstrap_servers: str, topic: str) -> list[int]:
    """The partition numbers of ``topic`` (none when it does not exist)."""
    # The admin client, because a consumer only learns the partitions of topics it subscribed.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(p["partition"] for d in described if d["topic"] == topic for p in d["partitions"])


@dataclass(frozen=True)
class TopicTail:
    keys: list[PublishedKey]
    end_offsets: dict[int, int]


async def read_tail(
    bootstrap_servers: str,
    topic: str,
    start_offsets: dict[int, int],
    *,
    since_ms: int,
    client_id: str,
) -> TopicTail:
    """Keys of every message of ``topic`` from ``start_offsets`` (per partition) to its end.

    A partition without a start offset is read from the first message at or after ``since_ms``.
    """
    tps = [TopicPartition(topic, p) for p in await topic_partitions(bootstrap_servers, topic)]
    if not tps:
        return TopicTail([], {})
    consumer = create_consumer(
        bootstrap_servers=bootstrap_servers, group_id=None, client_id=client_id
    )
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        starts = {tp: start_offsets[tp.partition] for tp in tps if tp.partition in start_offsets}
        unknown = [tp for tp in tps if tp not in starts]
        if unknown:
            found = await consumer.offsets_for_times({tp: since_ms for tp in unknown})
            for tp in unknown:
                starts[tp] = found[tp].offset if found.get(tp) is not None else ends[tp]
        todo = {tp for tp in tps if starts[tp] < ends[tp]}
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, min(starts[tp], ends[tp]))
        keys: list[PublishedKey] = []
        while todo:
            batches = await consumer.getmany(*todo, timeout_ms=1000)
            for tp, records in batches.items():
                keys.extend(_keys_of(r.value for r in records if r.offset < ends[tp]))
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
        return TopicTail(keys, {tp.partition: end for tp, end in ends.items()})
    finally:
        await consumer.stop()


def _keys_of(values: Iterable[bytes | None]) -> Iterable[PublishedKey]:
    for value in values:
        if value is None:
            continue
        try:
            yield published_key(decode(value, RawQuote))
        except DecodeError:
            continue  # not a quote: it cannot be a duplicate of one


async def recover(
    store: LedgerStore,
    bootstrap_servers: str,
    topic: str,
    *,
    now_ms: int,
    lookback_seconds: float,
    metrics: IngestorMetrics,
    client_id: str,
) -> Ledger:
    """The ledger as it must be before a poll: Redis's state plus what the topic has beyond it."""
    ledger = await store.load()
    tail = await read_tail(
        bootstrap_servers,
        topic,
        ledger.watermarks,
        since_ms=now_ms - int(lookback_seconds * 1000),
        client_id=client_id,
    )
    ledger.merge(tail.keys)
    for partition, end in tail.end_offsets.items():
        ledger.advance_watermark(partition, end)
    log.info(
        "dedupe state recovered",
        extra={"tokens": len(ledger.newest), "read_from_topic": len(tail.keys)},
    )
    await store.save(ledger, metrics)
    return ledger
