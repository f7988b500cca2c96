"""``tokvel backfill``: each entry of a file on the topic exactly once, also after interrupts."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis

from ingestor.backfill import BackfillOptions, Checkpoint, run_backfill
from ingestor.settings import IngestorSettings
from tests.integration.ingestor.conftest import (
    PROJECT_ROOT,
    as_env,
    assert_exactly_once,
    raw_topic,
    read_topic,
    recorded_snapshots,
)
from tokvel_common.paths import SHARED_DATA_DIR
from tokvel_common.settings import CommonSettings

pytestmark = pytest.mark.integration

CAPTURE = SHARED_DATA_DIR / "cmc-pro-api" / "listings_v1_2021-04-20T23-30-09Z.json"


def _config(settings: CommonSettings, topic_prefix: str, redis_url: str) -> IngestorSettings:
    return IngestorSettings(
        kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
        redis_url=redis_url,
        topic_prefix=topic_prefix,
        ingestor_linger_ms=5,
    )


def _first_entries(recording: Path, count: int) -> set[tuple[int, datetime]]:
    rows = [r for s in recorded_snapshots(recording, count // 190 + 2) for r in s][:count]
    assert len(rows) == count
    return {(r["cmc_id"], datetime.fromisoformat(r["ts"])) for r in rows}


async def test_a_backfill_publishes_each_entry_once_and_a_rerun_nothing(
    settings: CommonSettings, topic_prefix: str, redis_url: str, recording: Path
) -> None:
    config = _config(settings, topic_prefix, redis_url)
    options = BackfillOptions(recording, "v3", limit=1000, batch_size=300, progress=False)
    first = await run_backfill(config, options, asyncio.Event())
    again = await run_backfill(config, options, asyncio.Event())
    assert (first.published, first.end_index, first.interrupted) == (1000, 1000, False)
    assert (again.published, again.start_index) == (0, 1000)
    quotes = await read_topic(settings.kafka_bootstrap_servers, raw_topic(topic_prefix))
    assert_exactly_once(quotes, _first_entries(recording, 1000))
    assert {q.source for q in quotes} == {f"backfill:{recording.name}"}
    assert all(q.listed_at == q.polled_at == q.event_time() for q in quotes)


async def test_what_a_killed_run_delivered_past_its_checkpoint_is_not_sent_again(
    settings: CommonSettings, topic_prefix: str, redis_url: str, recording: Path
) -> None:
    """The crash window made exact: the checkpoint says record 200 and the topic's start, as
    if the run died after delivering records 200-599 but before checkpointing them."""
    config = _config(settings, topic_prefix, redis_url)
    options = BackfillOptions(recording, "v3", limit=600, batch_size=200, progress=False)
    await run_backfill(config, options, asyncio.Event())
    redis = Redis.from_url(redis_url)
    try:
        checkpoint = Checkpoint(redis, raw_topic(topic_prefix), recording)
        state = await checkpoint.load()
        assert state is not None and state.next_index == 600
        state.next_index = 200
        state.watermarks = dict.fromkeys(state.watermarks, 0)
        await checkpoint.save(state)
    finally:
        await redis.aclose()
    resumed = await run_backfill(config, options, asyncio.Event())
    assert (resumed.start_index, resumed.skipped, resumed.published) == (200, 400, 0)
    quotes = await read_topic(settings.kafka_bootstrap_servers, raw_topic(topic_prefix))
    assert_exactly_once(quotes, _first_entries(recording, 600))


async def test_a_cmc_capture_is_backfilled_as_received(
    settings: CommonSettings, topic_prefix: str, redis_url: str
) -> None:
    config = _config(settings, topic_prefix, redis_url)
    result = await run_backfill(
        config, BackfillOptions(CAPTURE, "v3", progress=False), asyncio.Event()
    )
    assert result.published == 100
    answer = json.loads(CAPTURE.read_text())
    quotes = {
        q.id: q for q in await read_topic(config.kafka_bootstrap_servers, raw_topic(topic_prefix))
    }
    assert set(quotes) == {e["id"] for e in answer["data"]}
    for entry in answer["data"]:
        quote = quotes[entry["id"]]
        assert isinstance(quote.quote, dict)  # v1 as captured, not reshaped
        usd = quote.quote_in("USD")
        assert usd is not None and usd.price == entry["quote"]["USD"]["price"]
        assert quote.listed_at == datetime.fromisoformat(answer["status"]["timestamp"])


async def _backfill_process(
    config: IngestorSettings, recording: Path, log: Path
) -> asyncio.subprocess.Process:
    tokvel = Path(sys.executable).parent / "tokvel"
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            tokvel, "backfill", str(recording), "--limit", "3000", "--rate", "1500",
            "--batch-size", "100", "--no-progress",
            cwd=PROJECT_ROOT, env=as_env(config), stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip


async def test_the_command_resumes_after_sigterm_and_after_a_kill_without_duplicates(
    settings: CommonSettings, topic_prefix: str, redis_url: str, recording: Path, tmp_path: Path
) -> None:
    config = _config(settings, topic_prefix, redis_url)
    log = tmp_path / "backfill.log"
    redis = Redis.from_url(redis_url)
    checkpoint = Checkpoint(redis, raw_topic(topic_prefix), recording)
    reached = 0
    try:
        for stop in (signal.SIGTERM, signal.SIGKILL):
            process = await _backfill_process(config, recording, log)
            # Interrupt once this run has checkpointed a few batches of its own.
            target = reached + 500
            while (state := await checkpoint.load()) is None or state.next_index < target:
                assert process.returncode is None, log.read_text()
                await asyncio.sleep(0.05)
            reached = state.next_index
            process.send_signal(stop)
            code = await asyncio.wait_for(process.wait(), 30)
            assert code == (130 if stop is signal.SIGTERM else -signal.SIGKILL), log.read_text()
    finally:
        await redis.aclose()
    assert reached < 3000
    process = await _backfill_process(config, recording, log)
    assert await asyncio.wait_for(process.wait(), 60) == 0, log.read_text()
    output = log.read_text()
    assert "interrupted, run again to resume" in output
    assert output.rstrip().splitlines()[-1].startswith("backfill ")
    quotes = await read_topic(settings.kafka_bootstrap_servers, raw_topic(topic_prefix))
    assert_exactly_once(quotes, _first_entries(recording, 3000))
