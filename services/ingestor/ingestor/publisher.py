"""Kafka publishing with delivery that surfaces: every failure is counted and re-sent.

The producer (``tokvel_common.kafka.create_producer``) is idempotent with ``acks=all``, lz4 and
batching, so its own retries never duplicate. A message whose delivery still fails is re-sent
here with backoff until Kafka takes it; only a shutdown stops that, and then what is left
undelivered is returned and logged, never dropped in silence.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata
from pydantic import BaseModel

from ingestor.aio import sleep_unless
from ingestor.metrics import IngestorMetrics
from ingestor.timing import backoff_delay
from tokvel_common.serialization import encode, encode_key

log = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

_RESEND_BASE_SECONDS = 0.2


@dataclass(frozen=True)
class Outgoing(Generic[ModelT]):
    key: int | None  # the cmc_id; None only for a dead letter without a usable id
    value: ModelT


@dataclass
class InFlight(Generic[ModelT]):
    """Messages handed to the producer whose acknowledgements are awaited by :meth:`deliver`."""

    topic: str
    messages: list[Outgoing[ModelT]]
    futures: list[asyncio.Future[RecordMetadata]]


@dataclass(frozen=True)
class DeliveryReport(Generic[ModelT]):
    delivered: list[Outgoing[ModelT]]
    metadata: list[RecordMetadata]
    undelivered: list[Outgoing[ModelT]]


class Publisher:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        metrics: IngestorMetrics,
        stop: asyncio.Event,
        *,
        retry_max_seconds: float,
        rng: random.Random | None = None,
    ) -> None:
        self._producer = producer
        self._metrics = metrics
        self._stop = stop
        self._retry_max = retry_max_seconds
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    async def send(self, topic: str, messages: Sequence[Outgoing[ModelT]]) -> InFlight[ModelT]:
        """Hand ``messages`` to the producer (batched by it); :meth:`deliver` awaits them."""
        in_flight = InFlight(topic, list(messages), [])
        for message in messages:
            in_flight.futures.append(await self._send_one(topic, message))
        return in_flight

    async def _send_one(
        self, topic: str, message: Outgoing[ModelT]
    ) -> asyncio.Future[RecordMetadata]:
        key = None if message.key is None else encode_key(message.key)
        try:
            future: asyncio.Future[RecordMetadata] = await self._producer.send(
                topic, value=encode(message.value), key=key
            )
        except KafkaError as exc:
            # Refused before it was queued (no metadata, buffer full...): a failed delivery.
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        return future

    async def deliver(self, in_flight: InFlight[ModelT]) -> DeliveryReport[ModelT]:
        """Await every acknowledgement, re-sending failures until delivered or shut down."""
        delivered: list[Outgoing[ModelT]] = []
        metadata: list[RecordMetadata] = []
        messages, futures = in_flight.messages, in_flight.futures
        attempt = 0
        while messages:
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed: list[Outgoing[ModelT]] = []
            for message, result in zip(messages, results, strict=True):
                if isinstance(result, RecordMetadata):
                    delivered.append(message)
                    metadata.append(result)
                else:
                    failed.append(message)
                    last_error = result
            if not failed:
                break
            self._metrics.delivery_failures.inc(len(failed))
            delay = backoff_delay(attempt, _RESEND_BASE_SECONDS, self._retry_max, self._rng)
            log.warning(
                "Kafka delivery failed, re-sending",
                extra={"topic": in_flight.topic, "failed": len(failed), "error": repr(last_error)},
            )
            if await sleep_unless(self._stop, delay):
                log.error(
                    "shutdown with undelivered messages",
                    extra={"topic": in_flight.topic, "messages": len(failed)},
                )
                return DeliveryReport(delivered, metadata, failed)
            messages = failed
            futures = [await self._send_one(in_flight.topic, m) for m in failed]
            attempt += 1
        return DeliveryReport(delivered, metadata, [])
