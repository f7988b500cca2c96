"""Token metadata from /v2/cryptocurrency/info: in batches, once per refresh age, on its topic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ingestor.settings import IngestorSettings
from tests.integration.ingestor.conftest import (
    ReplayServer,
    ingestor_settings,
    read_values,
    recorded_snapshots,
    replay_server,
    running_ingestor,
    wait_until,
)
from tokvel_common.events import TokenInfo
from tokvel_common.serialization import decode
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import TOKEN_INFO, prefixed

pytestmark = pytest.mark.integration

INFO_PATH = "/v2/cryptocurrency/info"


async def _info_requests_after_polls(
    server: ReplayServer, config: IngestorSettings, polls: int
) -> int:
    async with running_ingestor(config) as ingestor:
        await wait_until(
            f"{polls} polls", lambda: ingestor.sample("ingestor_polls_total", outcome="ok") >= polls
        )
        await asyncio.sleep(0.2)  # the last poll's metadata step, if any, is done
    requests: int = (await server.state())["requests_by_path"].get(INFO_PATH, 0)
    return requests


async def test_metadata_is_fetched_in_batches_once_per_refresh_age(
    settings: CommonSettings, topic_prefix: str, redis_url: str, recording: Path
) -> None:
    snapshot = recorded_snapshots(recording, 1)[0]
    async with replay_server(recording, snapshots=1) as server:
        config = ingestor_settings(
            settings, topic_prefix, redis_url, server.url, cmc_info_batch_size=100
        )
        # 195 tokens in batches of 100: two requests, then none on later polls...
        assert await _info_requests_after_polls(server, config, 4) == 2
        # ...nor after a restart (when each token was fetched is kept in Redis)...
        assert await _info_requests_after_polls(server, config, 3) == 2
        # ...until the copies are older than the refresh age.
        await asyncio.sleep(1.0)
        aged = config.model_copy(update={"cmc_info_refresh_seconds": 1.0})
        assert await _info_requests_after_polls(server, aged, 1) == 4
    values = await read_values(settings.kafka_bootstrap_servers, prefixed(topic_prefix, TOKEN_INFO))
    infos = [decode(v, TokenInfo) for v in values]
    assert len(infos) == 2 * len(snapshot)
    by_id = {info.cmc_id: info for info in infos}
    assert set(by_id) == {row["cmc_id"] for row in snapshot}
    for row in snapshot:
        info = by_id[row["cmc_id"]]
        assert (info.symbol, info.name, info.slug) == (row["symbol"], row["name"], row["slug"])
        assert info.description is None and info.website_url is None  # the recording has none
