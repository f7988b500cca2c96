"""The consumer loop against a fake consumer: commit order, pause/retry/resume, shutdown."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from writer.batcher import Batch, Batcher
from writer.consumer import WriterLoop
from writer.metrics import WriterMetrics

TOPIC = "t"
TP = TopicPartition(TOPIC, 0)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None = b"1"
    value: bytes | None = b"{}"


@dataclass
class FakeConsumer:
    """Hands out queued records of one partition; remembers commits and pauses."""

    pending: deque[Record] = field(default_factory=deque)
    commits: list[int] = field(default_factory=list)
    paused_partitions: set[TopicPartition] = field(default_factory=set)
    polls_while_paused: int = 0
    commit_seconds: float = 0.0

    def feed(self, start: int, count: int) -> None:
        self.pending.extend(Record(TOPIC, 0, offset) for offset in range(start, start + count))

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Record]]:
        await asyncio.sleep(0.001)
        if self.paused_partitions:
            self.polls_while_paused += 1
            return {}
        taken = [self.pending.popleft() for _ in range(min(max_records, len(self.pending)))]
        return {TP: taken} if taken else {}

    def highwater(self, tp: TopicPartition) -> int:
        return 10**6

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.difference_update(partitions)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await asyncio.sleep(self.commit_seconds)
        self.commits.append(offsets[TP])


@dataclass
class FakeSink:
    """Writes take ``write_seconds``; the first ``failures`` attempts fail, and every attempt
    at a batch ending at one of ``failing_ends``."""

    consumer: FakeConsumer
    write_seconds: float = 0.0
    prepare_seconds: float = 0.0
    failures: int = 0
    failing_ends: set[int] = field(default_factory=set)
    events: list[str] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    # The offsets committed when each write started.
    commits_at_write: dict[int, list[int]] = field(default_factory=dict)
    preparing: int = 0
    most_preparing: int = 0  # the most batches in preparation at once

    async def prepare(self, batch: Batch) -> Batch:
        self.events.append(f"prepare {batch.offsets[(TOPIC, 0)]}")
        self.preparing += 1
        self.most_preparing = max(self.most_preparing, self.preparing)
        await asyncio.sleep(self.prepare_seconds)
        self.preparing -= 1
        return batch

    async def write(self, prepared: Batch) -> None:
        end = prepared.offsets[(TOPIC, 0)]
        self.events.append(f"write {end}")
        self.commits_at_write.setdefault(end, list(self.consumer.commits))
        await asyncio.sleep(self.write_seconds)
        if self.failures or end in self.failing_ends:
            self.failures = max(0, self.failures - 1)
            raise ConnectionRefusedError("PostgreSQL is down")
        # Nothing may be committed past a batch before that batch is durable.
        assert not self.consumer.commits or self.consumer.commits[-1] < end
        self.written.append(end)
        self.events.append(f"durable {end}")


def _loop(consumer: FakeConsumer, sink: FakeSink, **options: float) -> WriterLoop[Batch]:
    return WriterLoop(
        consumer,
        Batcher(max_rows=10, max_seconds=0.05),
        sink,
        WriterMetrics(CollectorRegistry()),
        retry_max_seconds=options.get("retry_max_seconds", 0.05),
        shutdown_timeout_seconds=options.get("shutdown_timeout_seconds", 1.0),
        prepare_depth=int(options.get("prepare_depth", 1)),
    )


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the loop never got there")


async def test_the_next_batch_is_prepared_while_one_is_written_and_commits_stay_in_order() -> None:
    consumer = FakeConsumer()
    sink = FakeSink(consumer, write_seconds=0.05)
    loop = _loop(consumer, sink)
    consumer.feed(0, 40)
    task = asyncio.create_task(loop.run())
    await _until(lambda: consumer.commits[-1:] == [40])
    loop.request_stop()
    await task
    assert consumer.commits == [10, 20, 30, 40]
    assert sink.written == [10, 20, 30, 40]
    # Batch 2 was decoded while batch 1 was still in PostgreSQL.
    assert sink.events.index("prepare 20") < sink.events.index("durable 10")


async def test_polling_goes_on_while_batches_are_written() -> None:
    consumer = FakeConsumer()
    sink = FakeSink(consumer, write_seconds=0.5)
    loop = _loop(consumer, sink)
    consumer.feed(0, 25)
    task = asyncio.create_task(loop.run())
    # The third batch's messages are read while the first is still in PostgreSQL.
    await _until(lambda: not consumer.pending)
    assert sink.written == []
    loop.request_stop()
    await task
    assert consumer.commits == [10, 20, 25]


async def test_the_next_write_does_not_wait_for_the_commit_before_it() -> None:
    consumer = FakeConsumer(commit_seconds=0.2)
    sink = FakeSink(consumer)
    loop = _loop(consumer, sink)
    consumer.feed(0, 30)
    task = asyncio.create_task(loop.run())
    await _until(lambda: consumer.commits[-1:] == [30])
    loop.request_stop()
    await task
    assert consumer.commits == [10, 20, 30]
    # Batch 2 went to PostgreSQL while batch 1's offsets were being committed.
    assert sink.commits_at_write[20] == []


@pytest.mark.parametrize("depth", [1, 2])
async def test_batches_are_prepared_side_by_side_up_to_the_depth(depth: int) -> None:
    consumer = FakeConsumer()
    sink = FakeSink(consumer, prepare_seconds=0.2)
    loop = _loop(consumer, sink, prepare_depth=depth)
    consumer.feed(0, 40)
    task = asyncio.create_task(loop.run())
    await _until(lambda: consumer.commits[-1:] == [40])
    loop.request_stop()
    await task
    assert sink.most_preparing == depth
    assert consumer.commits == [10, 20, 30, 40] == sink.written


async def test_a_failing_write_pauses_consumption_commits_nothing_and_resumes() -> None:
    consumer = FakeConsumer()
    sink = FakeSink(consumer, failures=4)
    loop = _loop(consumer, sink)
    consumer.feed(0, 10)
    task = asyncio.create_task(loop.run())
    await _until(lambda: sink.events.count("write 10") >= 2)
    consumer.feed(10, 10)  # arrives during the outage: not fetched while paused
    assert consumer.paused_partitions == {TP} and consumer.commits == []
    await _until(lambda: consumer.commits[-1:] == [20])
    loop.request_stop()
    await task
    assert sink.events.count("write 10") == 5 and sink.written == [10, 20]
    assert consumer.polls_while_paused > 0  # it kept polling: the group keeps the member
    assert consumer.paused_partitions == set()


async def test_sigterm_writes_and_commits_what_was_read() -> None:
    consumer = FakeConsumer()
    sink = FakeSink(consumer)
    loop = _loop(consumer, sink)
    consumer.feed(0, 3)  # less than a batch: only the stop makes it due
    task = asyncio.create_task(loop.run())
    await _until(lambda: not consumer.pending)
    loop.request_stop()
    await task
    assert consumer.commits == [3]


async def test_sigterm_during_an_outage_gives_up_after_the_grace_period() -> None:
    consumer = FakeConsumer()
    sink = FakeSink(consumer, failures=10**6)
    loop = _loop(consumer, sink, shutdown_timeout_seconds=0.2)
    consumer.feed(0, 10)
    task = asyncio.create_task(loop.run())
    await _until(lambda: sink.events.count("write 10") >= 2)
    loop.request_stop()
    await asyncio.wait_for(task, 5)
    assert consumer.commits == []  # unwritten, so uncommitted: the next writer re-reads it


async def test_giving_up_on_a_batch_commits_nothing_after_it() -> None:
    consumer = FakeConsumer()
    sink = FakeSink(consumer, failing_ends={10})
    loop = _loop(consumer, sink, shutdown_timeout_seconds=0.2)
    consumer.feed(0, 15)
    task = asyncio.create_task(loop.run())
    await _until(lambda: sink.events.count("write 10") >= 2 and not consumer.pending)
    loop.request_stop()
    await asyncio.wait_for(task, 5)
    # The 5 read after the unwritten batch are not written either: their commit would cover it.
    assert consumer.commits == [] and sink.written == []
