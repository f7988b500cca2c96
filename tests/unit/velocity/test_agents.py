"""The velocity agent in Faust's test context: no broker, a fake producer the test controls.

The fake producer records every send and resolves its delivery when the test says so, which
shows the order the recovery design depends on: samples acknowledged -> state written ->
state acknowledged -> input acked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.unit.velocity.fake_kafka import FakeProducer
from tests.unit.velocity.quotes import T0, message, quote
from tokvel_common.events import DeadLetter, MetricsSample
from tokvel_common.serialization import decode
from velocity.agents import BatchProcessor
from velocity.app import VelocityApp, create_app
from velocity.publish import RecordPublisher
from velocity.rules import apply as real_apply
from velocity.settings import VelocitySettings
from velocity.tables import TokenState

PREFIX = "unit."
METRICS = f"{PREFIX}token.metrics"
LATEST = f"{PREFIX}token.metrics.latest"
DLQ = f"{PREFIX}cmc.quotes.dlq"
CHANGELOG = f"{PREFIX}tokvel-velocity-token-state-changelog"


@dataclass
class Harness:
    app: VelocityApp
    producer: FakeProducer
    put: Callable[..., Awaitable[Any]]
    agent: Any  # Faust's AgentTestWrapper

    def samples(self, topic: str = METRICS) -> list[MetricsSample]:
        return [decode(value, MetricsSample) for _, value, _ in self.producer.to(topic)]

    def letters(self) -> list[DeadLetter]:
        return [decode(value, DeadLetter) for _, value, _ in self.producer.to(DLQ)]


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait for a condition on the fake producer or the messages, which signal no event."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - polling state that has no event to wait on
            await asyncio.sleep(0.005)


HarnessFactory = Callable[..., Any]


@pytest.fixture
async def velocity(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start the agent in a test context: ``async with velocity(batch_size=..) as harness``."""

    def start(batch_size: int = 1, auto_ack: bool = True) -> Any:
        settings = VelocitySettings(
            topic_prefix=PREFIX,
            velocity_data_dir=tmp_path,
            velocity_expected_interval_seconds=300,
            velocity_batch_size=batch_size,
            velocity_batch_within_seconds=5.0,
        )
        app = create_app(settings)
        producer = FakeProducer(auto_ack=auto_ack)
        # The part of AIOKafkaProducer the publisher uses.
        app.processor.publisher = RecordPublisher(lambda: cast(AIOKafkaProducer, producer))
        return _Context(app, producer)

    yield start


class _EveryPartition:
    def __contains__(self, tp: object) -> bool:
        return True


class _Context:
    def __init__(self, app: VelocityApp, producer: FakeProducer) -> None:
        self._app, self._producer = app, producer
        self._context: Any = None

    async def __aenter__(self) -> Harness:
        # The consumer is never started here: only the lag metric reads it.
        consumer = cast(Any, self._app.consumer)
        consumer.assignment = _EveryPartition
        consumer.highwater = lambda tp: 1000
        self._context = self._app.agents["velocity"].test_context()
        agent = await self._context.__aenter__()

        async def put(value: bytes | None, key: bytes | None, partition: int = 0) -> Any:
            # AgentTestWrapper.put() without its wait, plus the reference the Conductor gives a
            # message for each stream it is delivered to (put() bypasses the Conductor).
            message = agent.to_message(key, value, partition=partition, offset=agent.sent_offset)
            message.incref()
            channel = agent.stream().channel
            event = await channel.decode(message)
            await channel.put(event)
            agent.sent_offset += 1
            return event

        return Harness(self._app, self._producer, put, agent)

    async def __aexit__(self, *exc_info: object) -> None:
        await self._context.__aexit__(*exc_info)
        # Creating Faust's consumer created its thread's event loop; never started, it is
        # never closed by Faust either.
        cast(Any, self._app.consumer)._thread.thread_loop.close()


async def put_quote(harness: Harness, **fields: Any) -> Any:
    key, value = message(quote(**fields))
    return await harness.put(value, key)


def stored_state(harness: Harness, cmc_id: int) -> TokenState:
    stored = harness.app.state_table.data.get(str(cmc_id).encode())
    assert stored is not None
    return TokenState.from_bytes(stored, 300)


async def test_samples_are_acknowledged_before_the_state_is_written_and_input_acked(
    velocity: HarnessFactory,
) -> None:
    async with velocity(batch_size=3, auto_ack=False) as harness:
        producer = harness.producer
        first = await put_quote(harness, cmc_id=1)
        await put_quote(harness, cmc_id=1, ts=T0.replace(minute=5))
        other = await put_quote(harness, cmc_id=2)
        await until(lambda: sum(count for _, count in producer.pending) == 5)
        assert len(producer.to(METRICS)) == 3
        assert [key for key, _, _ in producer.to(LATEST)] == [b"1", b"2"]  # newest per token
        assert producer.to(CHANGELOG) == []
        assert not first.message.acked

        assert producer.ack_pending() == 5  # the samples are durable: now the state
        await until(lambda: len(producer.to(CHANGELOG)) == 2)
        assert not first.message.acked
        assert producer.ack_pending() == 2  # the state is durable: now the input
        await until(lambda: first.message.acked and other.message.acked)

        assert [key for key, _, _ in producer.to(CHANGELOG)] == [b"1", b"2"]
        state = stored_state(harness, 1)
        assert (state.partition, state.offset) == (0, 1)
        assert state.windows.newest_ts == T0.replace(minute=5)


async def test_changelog_records_go_to_the_partition_of_their_input(
    velocity: HarnessFactory,
) -> None:
    async with velocity(batch_size=2) as harness:
        key, value = message(quote(cmc_id=7))
        await harness.put(value, key, partition=4)
        key, value = message(quote(cmc_id=8))
        await harness.put(value, key, partition=1)
        await until(lambda: len(harness.producer.to(CHANGELOG)) == 2)
        assert {(key, partition) for key, _, partition in harness.producer.to(CHANGELOG)} == {
            (b"7", 4),
            (b"8", 1),
        }
        assert stored_state(harness, 7).partition == 4


async def test_an_invalid_message_goes_to_the_dlq_and_the_stream_goes_on(
    velocity: HarnessFactory,
) -> None:
    async with velocity(batch_size=1) as harness:
        bad = await harness.put(b'{"id": 1, "quote": [', b"1")
        await put_quote(harness, cmc_id=1)
        await until(lambda: len(harness.samples()) == 1)
        (letter,) = harness.letters()
        assert letter.reason == "invalid_json"
        assert letter.raw == '{"id": 1, "quote": ['
        assert (letter.topic, letter.partition, letter.offset) == (
            bad.message.topic,
            0,
            bad.message.offset,
        )
        assert harness.producer.to(DLQ)[0][0] == b"1"  # keyed like the input
        await until(lambda: bad.message.acked)


async def test_duplicates_are_ignored_and_too_late_quotes_rejected(
    velocity: HarnessFactory,
) -> None:
    async with velocity(batch_size=4) as harness:
        await put_quote(harness, ts=T0.replace(hour=23))
        await put_quote(harness, ts=T0.replace(hour=23), volume=1.0)  # same last_updated
        await put_quote(harness, ts=T0.replace(hour=10))  # 13 h behind the newest
        await put_quote(harness, ts=T0.replace(hour=22))  # late but within 12 h: counted
        await until(lambda: len(harness.producer.to(CHANGELOG)) == 1)
        samples = harness.samples()
        assert [sample.ts.hour for sample in samples] == [23, 22]
        assert [sample.ts.hour for sample in harness.samples(LATEST)] == [23]
        (letter,) = harness.letters()
        assert letter.reason == "too_late" and letter.offset == 2
        state = stored_state(harness, 1)
        assert state.offset == 3  # every message of the token is marked as applied


async def test_redelivered_input_is_skipped(velocity: HarnessFactory) -> None:
    async with velocity(batch_size=1) as harness:
        event = await put_quote(harness)
        await until(lambda: event.message.acked)
        job = harness.app.processor.apply_batch([event])  # what a restart would deliver again
        assert (job.redelivered, job.records, job.samples) == (1, [], 0)


async def test_a_failed_delivery_is_retried_before_anything_else(
    velocity: HarnessFactory,
) -> None:
    async with velocity(batch_size=1) as harness:
        harness.producer.fail = 1
        event = await put_quote(harness)
        await until(lambda: event.message.acked, seconds=10)
        topics = [topic for topic, _, _, _ in harness.producer.sent]
        # The batch's records are sent again after the failure; the state only after them.
        assert topics == [METRICS, LATEST, METRICS, LATEST, CHANGELOG]


async def test_a_bug_on_one_message_sends_it_to_the_dlq(
    velocity: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with velocity(batch_size=1) as harness:

        def failing_apply(observation: Any, windows: Any) -> Any:
            if observation.quote.id == 13:
                raise ZeroDivisionError("bug")
            return real_apply(observation, windows)

        monkeypatch.setattr("velocity.agents.apply", failing_apply)
        await put_quote(harness, cmc_id=13)
        await put_quote(harness, cmc_id=14)
        await until(lambda: len(harness.samples()) == 1)
        assert [(letter.reason, letter.detail) for letter in harness.letters()] == [
            ("processing_error", "ZeroDivisionError('bug')")
        ]


async def test_metrics_count_what_happened(velocity: HarnessFactory) -> None:
    async with velocity(batch_size=3) as harness:
        await put_quote(harness)
        await put_quote(harness)  # duplicate
        await harness.put(orjson.dumps([1]), b"1")
        await until(lambda: len(harness.producer.to(CHANGELOG)) == 1)
        registry = harness.app.registry
        await until(lambda: registry.get_sample_value("velocity_quotes_consumed_total") == 3)
        assert registry.get_sample_value("velocity_samples_emitted_total") == 1
        assert registry.get_sample_value("velocity_quotes_duplicate_total") == 1
        assert (
            registry.get_sample_value("velocity_quotes_rejected_total", {"reason": "not_an_object"})
            == 1
        )
        assert registry.get_sample_value("velocity_state_tokens") == 1
        assert registry.get_sample_value("velocity_consumer_lag_messages", {"partition": "0"}) == (
            1000 - 2 - 1
        )


async def test_a_batch_the_agent_crashed_on_is_never_acked(
    velocity: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self: BatchProcessor, events: object) -> None:
        raise ZeroDivisionError("bug outside the per-message guard")

    monkeypatch.setattr(BatchProcessor, "apply_batch", crash)
    async with velocity(batch_size=1) as harness:
        event = await put_quote(harness)
        await until(lambda: harness.agent.state == "crashed")
        # Its offset can never be committed: the next owner of the partition processes it.
        assert not event.message.acked
        assert harness.producer.sent == []
