"""RebalanceSafeConsumer drops a fetch that a rebalance or seek overtook, and seeks again.

The race itself (a fetch returning after recovery's seek) depends on thread timing; it is
reproduced here by a stand-in for Faust's own fetch wait, which lets the test say what happens
while the fetch is waiting. The real-broker regression is the two-worker replay test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faust.transport import consumer as faust_consumer
from faust.types import TP

from velocity.app import create_app
from velocity.consumer import RebalanceSafeConsumer
from velocity.settings import VelocitySettings

RAW = TP("cmc.quotes.raw", 3)
RECORDS = {RAW: ["record 6444", "record 6445"]}
ACTIVE = {RAW}


class FaustStandIn:
    """Faust's ``_wait_next_records`` and ``perform_seek``, recorded."""

    def __init__(self, while_waiting: Callable[[RebalanceSafeConsumer], Awaitable[None]]) -> None:
        self.while_waiting = while_waiting
        self.seeks = 0
        self.fetches = 0
        self.records: dict[TP, list[str]] = RECORDS
        self.failing_seeks = 0  # how many of the next seeks raise


@pytest.fixture
def consumer(tmp_path: Path) -> Iterator[RebalanceSafeConsumer]:
    app = create_app(VelocitySettings(velocity_data_dir=tmp_path))
    created = app.consumer
    assert isinstance(created, RebalanceSafeConsumer)  # what create_app wires in
    yield created
    created._thread.thread_loop.close()  # its consumer thread's loop, never started here


def stand_in(
    monkeypatch: pytest.MonkeyPatch,
    while_waiting: Callable[[RebalanceSafeConsumer], Awaitable[None]],
) -> FaustStandIn:
    faust = FaustStandIn(while_waiting)

    # Plain functions: set on the class, they are bound to the consumer like Faust's methods.
    async def wait_next_records(consumer: RebalanceSafeConsumer, timeout: float) -> Any:  # noqa: ASYNC109
        faust.fetches += 1
        await faust.while_waiting(consumer)
        return faust.records, ACTIVE

    async def perform_seek(consumer: RebalanceSafeConsumer) -> None:
        faust.seeks += 1
        if faust.failing_seeks:
            faust.failing_seeks -= 1
            raise RuntimeError("no current assignment for partition")

    monkeypatch.setattr(faust_consumer.Consumer, "_wait_next_records", wait_next_records)
    monkeypatch.setattr(faust_consumer.Consumer, "perform_seek", perform_seek)
    return faust


async def nothing(consumer: RebalanceSafeConsumer) -> None:
    await asyncio.sleep(0)


async def rebalance(consumer: RebalanceSafeConsumer) -> None:
    consumer.app.consumer_generation_id += 1


async def recovery_seek(consumer: RebalanceSafeConsumer) -> None:
    await consumer.perform_seek()


async def test_a_fetch_nothing_overtook_is_handed_on(
    consumer: RebalanceSafeConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    faust = stand_in(monkeypatch, nothing)
    assert await consumer._wait_next_records(1.0) == (RECORDS, ACTIVE)
    assert faust.seeks == 0


@pytest.mark.parametrize("overtaken_by", [rebalance, recovery_seek])
async def test_a_fetch_overtaken_is_dropped_and_read_again_from_the_commit(
    consumer: RebalanceSafeConsumer,
    monkeypatch: pytest.MonkeyPatch,
    overtaken_by: Callable[[RebalanceSafeConsumer], Awaitable[None]],
) -> None:
    faust = stand_in(monkeypatch, overtaken_by)
    seeks_while_waiting = 1 if overtaken_by is recovery_seek else 0
    assert await consumer._wait_next_records(1.0) == (None, ACTIVE)
    assert faust.seeks == seeks_while_waiting + 1
    # The next fetch, with nothing in between, is current again.
    faust.while_waiting = nothing
    assert await consumer._wait_next_records(1.0) == (RECORDS, ACTIVE)
    assert faust.seeks == seeks_while_waiting + 1


async def test_an_empty_fetch_across_a_rebalance_needs_no_seek(
    consumer: RebalanceSafeConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    faust = stand_in(monkeypatch, rebalance)
    faust.records = {}
    assert await consumer._wait_next_records(1.0) == ({}, ACTIVE)
    assert (faust.fetches, faust.seeks) == (1, 0)


async def test_until_the_seek_succeeds_nothing_is_read(
    consumer: RebalanceSafeConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("velocity.consumer._SEEK_RETRY_SECONDS", 0)
    faust = stand_in(monkeypatch, rebalance)
    faust.failing_seeks = 2
    assert await consumer._wait_next_records(1.0) == (None, ACTIVE)  # dropped, seek failed
    faust.while_waiting = nothing
    assert await consumer._wait_next_records(1.0) == (None, None)  # seek failed again
    assert (faust.fetches, faust.seeks) == (1, 2)
    assert await consumer._wait_next_records(1.0) == (RECORDS, ACTIVE)  # sought, then read
    assert (faust.fetches, faust.seeks) == (2, 3)


async def test_changelog_records_across_a_rebalance_are_left_to_table_recovery(
    consumer: RebalanceSafeConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A seek to the committed offsets does not move the changelog's partitions (recovery
    # positions them), so its records must not be dropped: recovery would wait for them.
    (changelog,) = consumer.app.tables.changelog_topics
    recovered = {TP(changelog, 3): ["state of token 1"]}
    faust = stand_in(monkeypatch, rebalance)
    faust.records = {**RECORDS, **recovered}
    assert await consumer._wait_next_records(1.0) == (recovered, ACTIVE)
    assert faust.seeks == 1
    faust.records = recovered
    assert await consumer._wait_next_records(1.0) == (recovered, ACTIVE)
    assert faust.seeks == 1
