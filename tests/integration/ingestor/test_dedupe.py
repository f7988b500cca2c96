"""Dedupe on (cmc_id, last_updated): within a run, across restarts, after a crash between
publishing and recording it, and after Redis lost everything."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from redis.asyncio import Redis

from ingestor.ledger import LedgerStore
from ingestor.settings import IngestorSettings
from tests.integration.ingestor.conftest import (
    assert_exactly_once,
    expected_keys,
    ingestor_settings,
    own_keys_pattern,
    raw_topic,
    read_topic,
    read_values,
    recorded_snapshots,
    replay_server,
    running_ingestor,
    wait_until,
)
from tokvel_common.events import DeadLetter
from tokvel_common.paths import SHARED_DATA_DIR
from tokvel_common.serialization import decode
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import DEAD_LETTERS, prefixed

pytestmark = pytest.mark.integration


async def _poll_a_while(config: IngestorSettings, polls: int) -> float:
    """Run an ingestor for ``polls`` completed polls; how many quotes it published."""
    async with running_ingestor(config) as ingestor:
        await wait_until(
            f"{polls} polls", lambda: ingestor.sample("ingestor_polls_total", outcome="ok") >= polls
        )
        return ingestor.sample("ingestor_quotes_published_total")


async def test_an_unchanged_listing_is_published_once_however_often_polled(
    settings: CommonSettings, topic_prefix: str, redis_url: str, recording: Path
) -> None:
    expected = expected_keys(recorded_snapshots(recording, 1))
    async with replay_server(recording, snapshots=1) as server:
        config = ingestor_settings(settings, topic_prefix, redis_url, server.url)
        async with running_ingestor(config) as ingestor:
            await wait_until(
                "5 polls", lambda: ingestor.sample("ingestor_polls_total", outcome="ok") >= 5
            )
            skipped = ingestor.sample("ingestor_quotes_skipped_total", reason="already_published")
        assert skipped >= 4 * len(expected)
        assert_exactly_once(
            await read_topic(settings.kafka_bootstrap_servers, raw_topic(topic_prefix)), expected
        )


@pytest.mark.parametrize("lost", ["nothing", "the last save", "all of Redis"])
async def test_dedupe_survives_a_restart(
    settings: CommonSettings, topic_prefix: str, redis_url: str, recording: Path, lost: str
) -> None:
    """Restart with the state intact, after a crash between delivery and the Redis save (the
    topic past the watermark holds what Redis lacks), and with Redis emptied (rebuilt from the
    topic over the lookback)."""
    expected = expected_keys(recorded_snapshots(recording, 1))
    topic = raw_topic(topic_prefix)
    async with replay_server(recording, snapshots=1) as server:
        config = ingestor_settings(settings, topic_prefix, redis_url, server.url)
        assert await _poll_a_while(config, 2) == len(expected)
        redis = Redis.from_url(redis_url)
        try:
            store = LedgerStore(redis, topic)
            if lost == "the last save":
                await redis.delete(store.published_key)
                watermarks = await redis.hgetall(store.watermark_key)
                await redis.hset(store.watermark_key, mapping=dict.fromkeys(watermarks, 0))
            elif lost == "all of Redis":  # all this ingestor had there
                keys = [k async for k in redis.scan_iter(match=own_keys_pattern(topic_prefix))]
                assert store.published_key.encode() in keys
                await redis.delete(*keys)
        finally:
            await redis.aclose()
        assert await _poll_a_while(config, 3) == 0
    assert_exactly_once(await read_topic(settings.kafka_bootstrap_servers, topic), expected)


REAL_V1 = SHARED_DATA_DIR / "cmc-pro-api" / "listings_v1_2021-04-20T23-30-09Z.json"


@asynccontextmanager
async def _serve_answer(answer: dict[str, object]) -> AsyncIterator[str]:
    """A CMC stand-in that pages one recorded answer (its total_count exceeds its entries)."""

    async def listings(request: web.Request) -> web.Response:
        start, limit = int(request.query["start"]), int(request.query["limit"])
        data = answer["data"]
        assert isinstance(data, list)
        return web.json_response({**answer, "data": data[start - 1 : start - 1 + limit]})

    async def info(_: web.Request) -> web.Response:
        return web.json_response({"status": answer["status"], "data": {}})

    app = web.Application()
    app.router.add_get("/v1/cryptocurrency/listings/latest", listings)
    app.router.add_get("/v2/cryptocurrency/info", info)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_real_answer_goes_through_and_an_entry_that_fits_no_model_goes_to_the_dlq(
    settings: CommonSettings, topic_prefix: str, redis_url: str
) -> None:
    answer = json.loads(REAL_V1.read_text())
    spoiled = copy.deepcopy(answer)
    spoiled["data"][7]["id"] = "not-an-id"
    async with _serve_answer(spoiled) as url:
        config = ingestor_settings(
            settings, topic_prefix, redis_url, url, cmc_api_version="v1", cmc_page_limit=50
        )
        async with running_ingestor(config) as ingestor:
            await wait_until(
                "a poll", lambda: ingestor.sample("ingestor_polls_total", outcome="ok") >= 1
            )
            assert ingestor.sample("ingestor_quotes_invalid_total") == 1
    quotes = await read_topic(settings.kafka_bootstrap_servers, raw_topic(topic_prefix))
    assert sorted(q.id for q in quotes) == sorted(
        e["id"] for i, e in enumerate(answer["data"]) if i != 7
    )
    by_id = {q.id: q for q in quotes}
    btc = by_id[1].quote_in("USD")
    assert btc is not None and btc.price == answer["data"][0]["quote"]["USD"]["price"]
    letters = await _read_dead_letters(settings, topic_prefix)
    assert len(letters) == 1 and letters[0].reason == "invalid_entry"
    assert json.loads(letters[0].raw)["id"] == "not-an-id"


async def _read_dead_letters(settings: CommonSettings, topic_prefix: str) -> list[DeadLetter]:
    values = await read_values(
        settings.kafka_bootstrap_servers, prefixed(topic_prefix, DEAD_LETTERS)
    )
    return [decode(v, DeadLetter) for v in values]
