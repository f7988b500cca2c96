"""Batches bounded by size and time, and their decoding into samples, metadata and rejects.

No I/O here: the consumer loop feeds :class:`Batcher` what Kafka returned and writes what
:meth:`Batcher.take` hands back; :func:`decode_batch` turns its messages into models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from tokvel_common.events import DeadLetter, MetricsSample, TokenInfo
from tokvel_common.serialization import DecodeError, decode

TopicPartitionKey = tuple[str, int]

# token_metrics stores both as numeric(12, 8) with CHECK (0 <= v <= 100).
VELOCITY_MIN = 0.0
VELOCITY_MAX = 100.0


# A Message's fields as a plain tuple (a worker process gets these: they pickle faster).
MessageFields = tuple[str, int, int, bytes | None, bytes | None]


class Message(NamedTuple):
    """The part of a Kafka record the writer needs (so nothing here depends on aiokafka).

    A tuple: one is made per message, and a frozen dataclass costs several times more.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Batch:
    messages: list[Message]
    # Per partition, the offset to commit once the batch is durable: its last offset + 1.
    offsets: dict[TopicPartitionKey, int]


class Batcher:
    """Collects messages until ``max_rows`` of them, or until the first is ``max_seconds`` old."""

    def __init__(
        self,
        max_rows: int,
        max_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_rows = max_rows
        self._max_seconds = max_seconds
        self._clock = clock
        self._messages: list[Message] = []
        self._first_at: float | None = None

    def __len__(self) -> int:
        return len(self._messages)

    def add(self, messages: Iterable[Message]) -> None:
        before = len(self._messages)
        self._messages.extend(messages)
        if before == 0 and self._messages:
            self._first_at = self._clock()

    def room(self) -> int:
        """How many messages to ask Kafka for (at least one: a full batch is due anyway)."""
        return max(1, self._max_rows - len(self._messages))

    def seconds_until_due(self) -> float:
        """How long a poll may wait before the batch must be written (inf when empty)."""
        if self._first_at is None:
            return math.inf
        if len(self._messages) >= self._max_rows:
            return 0.0
        return max(0.0, self._first_at + self._max_seconds - self._clock())

    def due(self) -> bool:
        return self.seconds_until_due() == 0.0

    def take(self) -> Batch:
        messages, self._messages, self._first_at = self._messages, [], None
        offsets: dict[TopicPartitionKey, int] = {}
        for message in messages:
            key = (message.topic, message.partition)
            offsets[key] = max(offsets.get(key, 0), message.offset + 1)
        return Batch(messages, offsets)

    def discard(self, partitions: Iterable[TopicPartitionKey]) -> int:
        """Forget the messages of revoked partitions: uncommitted, the next owner reads them."""
        revoked = set(partitions)
        kept = [m for m in self._messages if (m.topic, m.partition) not in revoked]
        dropped = len(self._messages) - len(kept)
        self._messages = kept
        if not kept:
            self._first_at = None
        return dropped


@dataclass
class DecodedBatch:
    samples: list[MetricsSample] = field(default_factory=list)
    infos: list[TokenInfo] = field(default_factory=list)
    rejected: list[tuple[bytes | None, DeadLetter]] = field(default_factory=list)  # (key, letter)
    tombstones: int = 0


def _sample_problem(sample: MetricsSample) -> str | None:
    """Why PostgreSQL would refuse the sample (its CHECKs), as a dead-letter reason.

    No number can be NaN or infinite here: JSON has no such values, and ``decode`` (orjson)
    refuses ``NaN``, ``Infinity`` and literals beyond a double's range as invalid JSON.
    """
    # A chained comparison is False for NaN and infinities too.
    if not VELOCITY_MIN <= sample.velocity <= VELOCITY_MAX:
        return "velocity_out_of_range"
    if not VELOCITY_MIN <= sample.velocity_24h <= VELOCITY_MAX:
        return "velocity_24h_out_of_range"
    return None


def decode_batch(
    messages: Iterable[MessageFields], *, metrics_topic: str, info_topic: str, now: datetime
) -> DecodedBatch:
    """Samples and metadata of the batch; what cannot be stored becomes a dead letter.

    A ``None`` value is a tombstone of the compacted info topic: a deletion marker, not data.
    """
    decoded = DecodedBatch()
    for topic, partition, offset, key, value in messages:
        if value is None:
            decoded.tombstones += 1
            continue
        reason, detail = "", ""
        try:
            if topic == metrics_topic:
                sample = decode(value, MetricsSample)
                problem = _sample_problem(sample)
                if problem is None:
                    decoded.samples.append(sample)
                    continue
                reason, detail = problem, f"cmc_id={sample.cmc_id} ts={sample.ts.isoformat()}"
            elif topic == info_topic:
                decoded.infos.append(decode(value, TokenInfo))
                continue
            else:
                reason, detail = "unexpected_topic", topic
        except DecodeError as exc:
            reason, detail = exc.reason, exc.detail
        letter = DeadLetter(
            reason=reason,
            detail=detail,
            raw=value.decode("utf-8", errors="replace"),
            topic=topic,
            partition=partition,
            offset=offset,
            rejected_at=now,
        )
        decoded.rejected.append((key, letter))
    return decoded
