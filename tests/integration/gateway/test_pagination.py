"""Paging through /v1/tokens: never a token twice, never one missed, even while ranks change."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from tests.integration.gateway.conftest import Api, create_key, gateway_settings, serve
from tests.integration.gateway.dataset import Dataset, upsert_latest
from tests.support.recorded import metric_record
from writer.repository import METRIC_COLUMNS

pytestmark = pytest.mark.integration

SORTS = ("market_cap", "velocity", "velocity_7d", "percent_change_24h", "symbol", "rank")


async def follow(api: Api, **params: Any) -> tuple[list[int], dict[str, Any]]:
    """Every page, from the first to the last ``meta.next`` link; the first page's meta."""
    body = await api.json("/v1/tokens", **params)
    first_meta = body["meta"]
    ids = [t["cmc_id"] for t in body["data"]]
    while body["meta"]["next"]:
        response = await api.session.get(
            api.base_url + body["meta"]["next"], headers={"X-API-Key": api.key}
        )
        assert response.status == 200, await response.text()
        body = await response.json()
        assert body["meta"]["as_of"] == first_meta["as_of"], "pages stay on one snapshot"
        ids.extend(t["cmc_id"] for t in body["data"])
    return ids, first_meta


@pytest.mark.parametrize("sort", SORTS)
@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_pages_add_up_to_the_whole_ranking(api: Api, sort: str, order: str) -> None:
    whole = await api.json("/v1/tokens", sort=sort, order=order, limit=500)
    ids, meta = await follow(api, sort=sort, order=order, limit=17)
    assert len(ids) == len(set(ids)) == meta["total"]
    assert ids == [t["cmc_id"] for t in whole["data"]]


def ranking_at(dataset: Dataset, ids: list[int]) -> list[int]:
    samples = [dataset.latest[i] for i in ids]
    return [s.cmc_id for s in sorted(samples, key=lambda s: (-s.velocity, s.cmc_id))]


async def test_pages_pinned_to_as_of_survive_a_reshuffle(
    fresh_db_url: str, redis_url: str, dataset: Dataset
) -> None:
    key = await create_key(fresh_db_url, "enterprise")
    async with serve(gateway_settings(fresh_db_url, redis_url), key) as api:
        first = await api.json("/v1/tokens", sort="velocity", limit=20)
        total = first["meta"]["total"]
        listed = [i for i, s in dataset.latest.items() if dataset.newest - s.ts < timedelta(days=1)]
        expected = ranking_at(dataset, listed)
        assert [t["cmc_id"] for t in first["data"]] == expected[:20]

        # New samples turn the ranking upside down, as a writer batch would.
        later = dataset.newest + timedelta(minutes=5)
        reshuffled = [
            dataset.latest[cmc_id].model_copy(
                update={"ts": later, "velocity": round(0.001 * (position + 1), 8)}
            )
            for position, cmc_id in enumerate(expected)
        ]
        conn = await asyncpg.connect(fresh_db_url)
        try:
            await conn.copy_records_to_table(
                "token_metrics",
                records=[metric_record(dataset.token_ids[s.cmc_id], s) for s in reshuffled],
                columns=METRIC_COLUMNS,
            )
            await upsert_latest(conn, dataset.token_ids, reshuffled)
        finally:
            await conn.close()
        redis = Redis.from_url(redis_url)
        try:  # the writer drops the list pages a change affects
            pages = await redis.hkeys("tokens:list:index")
            if pages:
                await redis.delete(*pages)
        finally:
            await redis.aclose()

        ids = [t["cmc_id"] for t in first["data"]]
        link = first["meta"]["next"]
        while link:
            response = await api.session.get(api.base_url + link, headers={"X-API-Key": key})
            body = await response.json()
            assert body["meta"]["as_of"] == first["meta"]["as_of"]
            assert body["meta"]["total"] == total
            ids.extend(t["cmc_id"] for t in body["data"])
            link = body["meta"]["next"]
        assert len(ids) == len(set(ids)) == total
        assert ids == expected

        now = await api.json("/v1/tokens", sort="velocity", limit=20)
        assert now["meta"]["as_of"] != first["meta"]["as_of"]
        assert [t["cmc_id"] for t in now["data"]] == list(reversed(expected))[:20]
