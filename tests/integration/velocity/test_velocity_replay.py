"""Real velocity workers on the real broker, replaying three recorded days (replay.py).

Each test publishes the same ~30 000 messages into its own cmc.quotes.raw and compares every
sample the workers publish with the independent reference (reference.py): velocity and every
window to 1e-8, coverage, trend, quality score and flags, and the raw fields exactly; the
newest sample of each token on token.metrics.latest; every dead letter with its reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.velocity.replay import (
    OutputReader,
    Worker,
    assert_output_matches,
    delete_topics,
    expectations,
    publish,
    recorded_messages,
)
from tokvel_common.settings import CommonSettings

pytestmark = pytest.mark.integration

REPLAY_SECONDS = 150.0


@pytest.fixture
async def prefix(settings: CommonSettings, topic_prefix: str) -> AsyncIterator[str]:
    """The test's topics; Faust's own (the changelog) are deleted after the test too."""
    yield topic_prefix
    await delete_topics(settings.kafka_bootstrap_servers, topic_prefix)


async def wait_ready(worker: Worker, seconds: float = 60) -> None:
    async with asyncio.timeout(seconds):
        while True:
            try:
                status, _ = await worker.get("/readyz")
            except OSError:
                status = 0
            if status == 200:
                return
            await asyncio.sleep(0.2)


async def test_one_worker_reproduces_the_reference_exactly(
    settings: CommonSettings, prefix: str, tmp_path: Path
) -> None:
    expected = expectations()
    await publish(settings.kafka_bootstrap_servers, prefix, recorded_messages())
    worker = Worker(settings.kafka_bootstrap_servers, prefix, tmp_path, "worker")
    await worker.start()
    try:
        async with OutputReader(settings.kafka_bootstrap_servers, prefix) as reader:
            output = await reader.read_complete(expected, REPLAY_SECONDS, [worker])
            assert_output_matches(output, expected)
            # Each sample was published once: nothing was redelivered in an uninterrupted run.
            assert all(len(copies) == 1 for copies in output.samples.values())
        status, health = await worker.get("/healthz")
        assert (status, health) == (200, {"status": "ok"})
        status, ready = await worker.get("/readyz")
        assert status == 200, ready
        consumed = await worker.metric("velocity_quotes_consumed_total")
        assert consumed == len(recorded_messages())
        assert await worker.metric("velocity_samples_emitted_total") == len(expected.samples)
        assert await worker.metric("velocity_quotes_duplicate_total") == expected.duplicates
        assert await worker.metric("velocity_state_tokens") == len(expected.latest)
    finally:
        code = await worker.stop()
    assert code == 0, worker.log_tail()


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
async def test_kill_9_during_the_replay_changes_no_output(
    settings: CommonSettings, prefix: str, tmp_path: Path, store: str
) -> None:
    expected = expectations()
    await publish(settings.kafka_bootstrap_servers, prefix, recorded_messages())
    worker = Worker(settings.kafka_bootstrap_servers, prefix, tmp_path, "killed", store)
    async with OutputReader(settings.kafka_bootstrap_servers, prefix) as reader:
        for fraction in (0.15, 0.4, 0.7):
            await worker.start()
            await reader.read_until(
                lambda out, f=fraction: len(out.samples) >= f * len(expected.samples),
                REPLAY_SECONDS,
            )
            await worker.kill()
        await worker.start()
        try:
            output = await reader.read_complete(expected, REPLAY_SECONDS, [worker])
            # The restarted worker resumed from its changelog and committed offsets: the
            # distinct samples, and so every window, are those of an uninterrupted run.
            assert_output_matches(output, expected)
            # ...and it resumed: it did not read the topic again from the beginning.
            consumed = await worker.metric("velocity_quotes_consumed_total")
            assert consumed is not None and 0 < consumed < len(recorded_messages())
        finally:
            code = await worker.stop()
    assert code == 0, worker.log_tail()


async def test_two_workers_share_the_partitions_and_agree_with_one(
    settings: CommonSettings, prefix: str, tmp_path: Path
) -> None:
    expected = expectations()
    messages = recorded_messages()
    half = len(messages) // 2
    bootstrap = settings.kafka_bootstrap_servers
    await publish(bootstrap, prefix, messages[:half])
    first = Worker(bootstrap, prefix, tmp_path, "first")
    second = Worker(bootstrap, prefix, tmp_path, "second")
    await first.start()
    try:
        async with OutputReader(bootstrap, prefix) as reader:
            # The first worker applies the first half alone; then the second joins, and the
            # state of the partitions it takes over reaches it through the changelog.
            await reader.read_until(
                lambda out: len(out.samples) >= 0.45 * len(expected.samples), REPLAY_SECONDS
            )
            await second.start()
            await wait_ready(second)
            await publish(bootstrap, prefix, messages[half:])
            output = await reader.read_complete(expected, REPLAY_SECONDS, [first, second])
            assert_output_matches(output, expected)
        for worker in (first, second):
            consumed = await worker.metric("velocity_quotes_consumed_total")
            assert consumed, f"{worker.name} processed nothing"
    finally:
        codes = [await first.stop(), await second.stop()]
    assert codes == [0, 0], first.log_tail() + second.log_tail()
