"""``/v1/tokens/{cmc_id}/history``: raw and aggregated in SQL, linear fill, cursor pages, CSV."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.integration.gateway.conftest import Api, create_key, gateway_settings, serve
from tests.integration.gateway.dataset import Dataset

pytestmark = pytest.mark.integration

DAY_ONE = {"from": "2017-08-10T00:00:00Z", "to": "2017-08-11T00:00:00Z"}


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_raw_defaults_to_the_last_day_up_to_the_newest_sample(
    api: Api, dataset: Dataset
) -> None:
    body = await api.json("/v1/tokens/1/history")
    points = body["data"]
    assert len(points) == 288
    assert ts(points[-1]["ts"]) == dataset.latest[1].ts
    assert points[-1]["velocity"] == dataset.latest[1].velocity
    assert all(p["samples"] == 1 and not p["interpolated"] for p in points)
    times = [ts(p["ts"]) for p in points]
    assert times == sorted(times)
    assert body["meta"]["next_cursor"] is None
    assert body["meta"]["interval"] == "raw"


@pytest.mark.parametrize(("interval", "hours"), [("5m", 1 / 12), ("1h", 1), ("1d", 24)])
async def test_aggregates_match_the_raw_samples(api: Api, interval: str, hours: float) -> None:
    raw = (await api.json("/v1/tokens/1027/history", **DAY_ONE))["data"]
    body = await api.json("/v1/tokens/1027/history", interval=interval, **DAY_ONE)
    width = timedelta(hours=hours)
    origin = datetime(2000, 1, 1, tzinfo=ts(raw[0]["ts"]).tzinfo)
    buckets: dict[datetime, list[dict[str, Any]]] = defaultdict(list)
    for point in raw:
        moment = ts(point["ts"])
        buckets[origin + ((moment - origin) // width) * width].append(point)
    assert [ts(p["ts"]) for p in body["data"]] == sorted(buckets)
    for point in body["data"]:
        members = buckets[ts(point["ts"])]
        assert point["samples"] == len(members)
        velocities = [m["velocity"] for m in members if m["volume_24h_usd"] is not None]
        assert point["velocity"] == pytest.approx(sum(velocities) / len(velocities))
        assert point["velocity_min"] == min(velocities)
        assert point["velocity_max"] == max(velocities)
        assert point["price_usd"] == pytest.approx(
            sum(m["price_usd"] for m in members) / len(members)
        )


async def test_cursor_pages_add_up_to_the_whole(api: Api) -> None:
    whole = (await api.json("/v1/tokens/1/history", **DAY_ONE))["data"]
    for interval in ("raw", "5m"):
        expected = (await api.json("/v1/tokens/1/history", interval=interval, **DAY_ONE))["data"]
        if interval == "raw":
            assert expected == whole
        pages: list[dict[str, Any]] = []
        params: dict[str, Any] = {"interval": interval, "limit": 37, **DAY_ONE}
        while True:
            body = await api.json("/v1/tokens/1/history", **params)
            pages.extend(body["data"])
            assert body["meta"]["count"] == len(body["data"]) <= 37
            if body["meta"]["next_cursor"] is None:
                break
            assert body["meta"]["next"].startswith("/v1/tokens/1/history?")
            params["cursor"] = body["meta"]["next_cursor"]
        assert pages == expected
    other = await api.get("/v1/tokens/1/history", interval="1h", cursor=params["cursor"], **DAY_ONE)
    assert other.status == 400
    assert (await other.json())["error"]["code"] == "invalid_cursor"


async def test_csv_streams_the_same_rows(api: Api) -> None:
    json_rows = (await api.json("/v1/tokens/1/history", interval="1h", **DAY_ONE))["data"]
    response = await api.get("/v1/tokens/1/history", interval="1h", format="csv", **DAY_ONE)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert "X-RateLimit-Remaining" in response.headers
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert len(rows) == len(json_rows) == 24
    for row, point in zip(rows, json_rows, strict=True):
        assert ts(row["ts"]) == ts(point["ts"])
        assert float(row["velocity"]) == pytest.approx(point["velocity"])
        assert int(row["samples"]) == point["samples"]
        assert row["interpolated"] == "false"


async def test_linear_fill_marks_interpolated_points(
    fresh_db_url: str, redis_url: str, dataset: Dataset
) -> None:
    conn = await asyncpg.connect(fresh_db_url)
    try:
        await conn.execute(
            """DELETE FROM token_metrics
               WHERE token_id = $1 AND "timestamp" >= $2 AND "timestamp" < $3""",
            dataset.token_ids[1],
            ts("2017-08-10T10:00:00Z"),
            ts("2017-08-10T13:00:00Z"),
        )
    finally:
        await conn.close()
    key = await create_key(fresh_db_url, "enterprise")
    async with serve(gateway_settings(fresh_db_url, redis_url), key) as api:
        plain = (await api.json("/v1/tokens/1/history", interval="1h", **DAY_ONE))["data"]
        assert len(plain) == 21  # three hours are missing
        filled = (await api.json("/v1/tokens/1/history", interval="1h", fill="linear", **DAY_ONE))[
            "data"
        ]
        assert len(filled) == 24
        by_hour = {ts(p["ts"]).hour: p for p in filled}
        before, after = by_hour[9], by_hour[13]
        for hour in (10, 11, 12):
            point = by_hour[hour]
            assert point["interpolated"] is True and point["samples"] == 0
            share = (hour - 9) / 4
            for field in ("velocity", "price_usd", "velocity_7d"):
                expected = before[field] + (after[field] - before[field]) * share
                assert point[field] == pytest.approx(expected, rel=1e-12), field
            assert point["velocity_min"] is None and point["data_quality_score"] is None
        assert all(not p["interpolated"] for h, p in by_hour.items() if h not in (10, 11, 12))
        # Paging a filled series gives the same points.
        pages: list[dict[str, Any]] = []
        params: dict[str, Any] = {"interval": "1h", "fill": "linear", "limit": 5, **DAY_ONE}
        while True:
            body = await api.json("/v1/tokens/1/history", **params)
            pages.extend(body["data"])
            if body["meta"]["next_cursor"] is None:
                break
            params["cursor"] = body["meta"]["next_cursor"]
        assert pages == filled


async def test_nothing_is_extrapolated(api: Api) -> None:
    body = await api.json(
        "/v1/tokens/1/history",
        interval="1h",
        fill="linear",
        **{"from": "2017-08-09T00:00:00Z", "to": "2017-08-10T03:00:00Z"},
    )
    assert [ts(p["ts"]).hour for p in body["data"]] == [0, 1, 2]
    assert body["meta"]["from"] == "2017-08-09T00:00:00Z"
