"""Every endpoint over HTTP against real data: answers, freshness, cache-aside, errors."""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import time
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from tests.integration.gateway.conftest import Api, create_key, gateway_settings, serve
from tests.integration.gateway.dataset import Dataset, token_snapshot
from tokvel_common.cache import (
    TOKEN_TTL_SECONDS,
    VELOCITY_TTL_SECONDS,
    access_bucket_key,
    snapshot_entries,
    token_key,
    velocity_key,
)

pytestmark = pytest.mark.integration

RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
IETF_HEADERS = ("RateLimit", "RateLimit-Policy")


def assert_error(body: Any, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    assert "Traceback" not in body["error"]["message"]


def listed(dataset: Dataset) -> list[int]:
    """The tokens the ranking holds: newest sample within a day of the newest of all."""
    newest = dataset.newest
    return [
        cmc_id for cmc_id, s in dataset.latest.items() if (newest - s.ts).total_seconds() < 86_400
    ]


# ----------------------------------------------------------------------------------- /v1/tokens


async def test_list_is_ranked_by_market_cap_with_meta(api: Api, dataset: Dataset) -> None:
    response = await api.get("/v1/tokens")
    assert response.status == 200
    for header in (*RATE_HEADERS, *IETF_HEADERS):
        assert header in response.headers
    body = await response.json()
    meta = body["meta"]
    assert meta["total"] == len(listed(dataset))
    assert meta["sort"] == "market_cap" and meta["order"] == "desc"
    assert meta["as_of"] == dataset.newest.isoformat().replace("+00:00", "Z")
    assert meta["age_s"] > 0
    caps = [t["market_cap_usd"] for t in body["data"]]
    expected = sorted(
        (dataset.latest[i] for i in listed(dataset)),
        key=lambda s: (s.market_cap_usd is None, -(s.market_cap_usd or 0), s.cmc_id),
    )
    assert [t["cmc_id"] for t in body["data"]] == [s.cmc_id for s in expected[:50]]
    assert caps == sorted(caps, reverse=True)
    assert meta["next"].startswith("/v1/tokens?") and "as_of=" in meta["next"]


@pytest.mark.parametrize(
    ("sort", "field"),
    [
        ("volume_24h", "volume_24h_usd"),
        ("velocity", "velocity"),
        ("velocity_7d", "velocity_7d"),
        ("price", "price_usd"),
        ("percent_change_24h", "percent_change_24h"),
        ("symbol", "symbol"),
        ("name", "name"),
        ("rank", "cmc_rank"),
    ],
)
@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_every_sort_orders_with_nulls_last_and_cmc_id_ties(
    api: Api, sort: str, field: str, order: str
) -> None:
    body = await api.json("/v1/tokens", sort=sort, order=order, limit=500)
    rows = body["data"]
    assert len(rows) == body["meta"]["total"]
    values = [r[field] for r in rows]
    present = [v for v in values if v is not None]
    assert values[: len(present)] == present, "nulls come last"
    for a, b in itertools.pairwise(rows):
        va, vb = a[field], b[field]
        if va is None or vb is None:
            continue
        if va == vb:
            assert a["cmc_id"] < b["cmc_id"], "ties are broken by cmc_id"
    if sort not in ("symbol", "name"):  # text order is the database collation's
        assert present == sorted(present, reverse=order == "desc")


async def test_list_page_is_cached_and_registered(api: Api, redis_url: str) -> None:
    first = await api.json("/v1/tokens", sort="velocity", limit=10)
    second = await api.json("/v1/tokens", sort="velocity", limit=10)
    assert first["meta"]["source"] == "database"
    assert second["meta"]["source"] == "cache"
    assert first["data"] == second["data"]
    redis = Redis.from_url(redis_url)
    try:
        key = "tokens:list:-velocity:10:0"
        assert 0 < await redis.ttl(key) <= 300
        index = await redis.hgetall("tokens:list:index")
        assert key.encode() in index
    finally:
        await redis.aclose()


# ----------------------------------------------------------------------- /v1/tokens/{cmc_id}


async def test_token_detail_from_database_then_cache(
    api: Api, dataset: Dataset, redis_url: str
) -> None:
    sample = dataset.latest[1]
    first = await api.json("/v1/tokens/1")
    assert first["meta"]["source"] == "database"
    assert first["data"]["token"]["symbol"] == "BTC"
    metrics = first["data"]["metrics"]
    assert metrics["price_usd"] == sample.price_usd
    assert metrics["market_cap_usd"] == sample.market_cap_usd
    assert metrics["velocity"] == sample.velocity
    assert metrics["velocity_7d"] == pytest.approx(sample.velocity_7d)
    assert metrics["coverage"]["1h"] == {"points_used": 12, "points_expected": 12}
    assert first["meta"]["as_of"] == sample.ts.isoformat().replace("+00:00", "Z")
    redis = Redis.from_url(redis_url)
    try:
        assert 0 < await redis.ttl(token_key(1)) <= TOKEN_TTL_SECONDS
        assert 0 < await redis.ttl(velocity_key(1, "7d")) <= VELOCITY_TTL_SECONDS
    finally:
        await redis.aclose()
    second = await api.json("/v1/tokens/1")
    assert second["meta"]["source"] == "cache"
    assert second["data"] == first["data"]


async def test_a_cached_value_is_served_as_cached(
    api: Api, dataset: Dataset, redis_url: str
) -> None:
    """Cache-aside reads Redis first: what the writer stored is what clients get."""
    sample = dataset.latest[1027].model_copy(update={"price_usd": 12345.5})
    redis = Redis.from_url(redis_url)
    try:
        for key, value, ttl in snapshot_entries(token_snapshot(sample)):
            await redis.set(key, value, ex=ttl)
    finally:
        await redis.aclose()
    body = await api.json("/v1/tokens/1027")
    assert body["meta"]["source"] == "cache"
    assert body["data"]["metrics"]["price_usd"] == 12345.5


async def test_reads_are_counted_for_predictive_warming(api: Api, redis_url: str) -> None:
    for _ in range(3):
        await api.json("/v1/tokens/1")
    await api.json("/v1/tokens/1/velocity")
    redis = Redis.from_url(redis_url)
    try:  # counted in memory, added to the bucket within a second
        deadline = time.monotonic() + 3
        while await redis.zscore(access_bucket_key(time.time()), "1") != 4:
            assert time.monotonic() < deadline, "access counts never reached Redis"
            await asyncio.sleep(0.1)
        assert 0 < await redis.ttl(access_bucket_key(time.time())) <= 900
    finally:
        await redis.aclose()


async def test_hit_and_miss_metrics(api: Api) -> None:
    await api.json("/v1/tokens/52")
    await api.json("/v1/tokens/52")
    text = await (await api.session.get(api.base_url + "/metrics")).text()
    assert 'gateway_cache_lookups_total{kind="token",result="hit"} 1.0' in text
    assert 'gateway_cache_lookups_total{kind="token",result="miss"} 1.0' in text


async def test_velocity_has_windows_coverage_trend_and_quality(api: Api, dataset: Dataset) -> None:
    sample = dataset.latest[1]
    for source in ("database", "cache"):
        body = await api.json("/v1/tokens/1/velocity")
        assert body["meta"]["source"] == source
        data = body["data"]
        assert data["velocity"] == data["velocity_24h"] == sample.velocity
        assert set(data["windows"]) == {"1h", "4h", "12h", "24h", "7d"}
        assert data["windows"]["4h"]["points_used"] == 48
        assert data["windows"]["24h"]["points_used"] is None
        trend = data["trend"]
        assert trend["direction"] == sample.trend
        assert trend["recent_avg"] == pytest.approx(sample.trend_recent_avg)
        assert trend["change_ratio"] == pytest.approx(
            (trend["current"] - trend["recent_avg"]) / trend["recent_avg"]
        )
        assert trend["threshold"] == 0.05
        assert data["data_quality_score"] == sample.data_quality_score
        assert data["quality_flags"] == sample.quality_flags
        assert data["calculated_at"] == body["meta"]["as_of"]


# ---------------------------------------------------------------- /v1/symbols, /v1/usage


async def test_symbol_lists_every_token_sharing_it_by_rank(api: Api, dataset: Dataset) -> None:
    for symbol, ids in dataset.colliding_symbols.items():
        body = await api.json(f"/v1/symbols/{symbol.lower()}")
        assert sorted(t["cmc_id"] for t in body["data"]) == ids
        ranks = [t["cmc_rank"] for t in body["data"]]
        present = [r for r in ranks if r is not None]
        assert ranks[: len(present)] == sorted(present)
        assert body["meta"]["total"] == len(ids)


async def test_usage_reports_limits_without_counting(api: Api) -> None:
    await api.json("/v1/tokens/1")
    first = await api.json("/v1/usage")
    second = await api.json("/v1/usage")
    assert first["data"]["tier"] == "enterprise"
    assert first["data"]["minute"]["limit"] == 6000
    assert first["data"]["month"]["limit"] == 10_000_000
    assert first["data"]["minute"]["used"] == second["data"]["minute"]["used"] == 1
    assert first["data"]["limiter"] == "redis"
    assert first["meta"]["source"] == "live"


# --------------------------------------------------------------------------------- errors


async def test_missing_malformed_and_unknown_keys_are_401(api: Api) -> None:
    missing = await api.get("/v1/tokens/1", auth=False)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("ApiKey")
    assert_error(await missing.json(), "missing_api_key")
    for key in ("nope", api.key[:-1] + ("A" if api.key[-1] != "A" else "B"), "tvk_" + "0" * 39):
        response = await api.get("/v1/tokens/1", key=key)
        assert response.status == 401, key
        assert_error(await response.json(), "invalid_api_key")
    from tokvel_common.apikeys import generate_key

    unknown = await api.get("/v1/tokens/1", key=generate_key())
    assert unknown.status == 401
    assert_error(await unknown.json(), "invalid_api_key")


async def test_revoked_key_is_403(api: Api) -> None:
    key = await api.new_key()
    conn = await asyncpg.connect(api.database_url)
    try:
        await conn.execute("UPDATE api_keys SET is_active = false WHERE key_prefix = $1", key[:12])
    finally:
        await conn.close()
    response = await api.get("/v1/tokens/1", key=key)
    assert response.status == 403
    assert_error(await response.json(), "api_key_revoked")


async def test_unknown_resources_are_404(api: Api) -> None:
    for path, code in (
        ("/v1/tokens/999999999999", "token_not_found"),
        ("/v1/tokens/999999999999/velocity", "token_not_found"),
        ("/v1/tokens/999999999999/history", "token_not_found"),
        ("/v1/symbols/NOSUCHCOIN", "symbol_not_found"),
        ("/v1/nothing-here", "not_found"),
    ):
        response = await api.get(path)
        assert response.status == 404, path
        assert_error(await response.json(), code)
        assert "X-RateLimit-Limit" in response.headers
    outside = await api.session.get(api.base_url + "/nothing")
    assert outside.status == 404
    assert_error(await outside.json(), "not_found")


def _bomb(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("path", "params", "code"),
    [
        ("/v1/tokens", {"limit": "0"}, "invalid_parameter"),
        ("/v1/tokens", {"limit": "1" + "0" * 30}, "invalid_parameter"),
        ("/v1/tokens", {"limit": "9" * 5000}, "invalid_parameter"),
        ("/v1/tokens", {"limit": "1e309"}, "invalid_parameter"),
        ("/v1/tokens", {"limit": "NaN"}, "invalid_parameter"),
        ("/v1/tokens", {"offset": "-1"}, "invalid_parameter"),
        ("/v1/tokens", {"offset": str(2**63)}, "invalid_parameter"),
        ("/v1/tokens", {"sort": "market_cap; DROP TABLE tokens"}, "invalid_parameter"),
        ("/v1/tokens", {"sort": _bomb(1_000)}, "invalid_parameter"),
        ("/v1/tokens", {"as_of": "2017-13-45T00:00:00Z"}, "invalid_parameter"),
        ("/v1/tokens", {"as_of": "9999-12-31T23:59:59Z"}, "invalid_parameter"),
        ("/v1/tokens", {"as_of": "0001-01-01T00:00:00Z"}, "invalid_parameter"),
        ("/v1/tokens", {"colour": "blue"}, "invalid_parameter"),
        ("/v1/tokens/abc", {}, "invalid_cmc_id"),
        ("/v1/tokens/0", {}, "invalid_cmc_id"),
        ("/v1/tokens/-5", {}, "invalid_cmc_id"),
        ("/v1/tokens/99999999999999999999", {}, "invalid_cmc_id"),
        ("/v1/tokens/1", {"x": "1"}, "invalid_parameter"),
        ("/v1/tokens/1/history", {"from": "yesterday"}, "invalid_parameter"),
        ("/v1/tokens/1/history", {"to": "2017-02-30T00:00:00Z"}, "invalid_parameter"),
        ("/v1/tokens/1/history", {"interval": "7m"}, "invalid_parameter"),
        ("/v1/tokens/1/history", {"fill": "linear"}, "invalid_fill"),
        ("/v1/tokens/1/history", {"format": "xml"}, "invalid_parameter"),
        ("/v1/tokens/1/history", {"limit": "10001"}, "invalid_parameter"),
        ("/v1/tokens/1/history", {"cursor": "not-a-cursor"}, "invalid_cursor"),
        (
            "/v1/tokens/1/history",
            {"cursor": base64.urlsafe_b64encode(_bomb(40).encode()).decode()},
            "invalid_cursor",
        ),
        ("/v1/tokens/1/history", {"cursor": "A" * 5000}, "invalid_parameter"),
        (
            "/v1/tokens/1/history",
            {"from": "2017-08-11T00:00:00Z", "to": "2017-08-10T00:00:00Z"},
            "invalid_range",
        ),
        (
            "/v1/tokens/1/history",
            {"from": "2017-01-01T00:00:00Z", "to": "2017-08-10T00:00:00Z"},
            "range_too_large",
        ),
        ("/v1/symbols/%01%02", {}, "invalid_symbol"),
        ("/v1/symbols/" + "X" * 65, {}, "invalid_symbol"),
    ],
)
async def test_bad_parameters_are_400(
    api: Api, path: str, params: dict[str, str], code: str
) -> None:
    response = await api.get(path, **params)
    assert response.status == 400, (path, params, await response.text())
    assert_error(await response.json(), code)
    assert "X-RateLimit-Remaining" in response.headers


async def test_repeated_parameter_and_wrong_method(api: Api) -> None:
    response = await api.session.get(
        api.base_url + "/v1/tokens?limit=1&limit=2", headers={"X-API-Key": api.key}
    )
    assert response.status == 400
    assert_error(await response.json(), "invalid_parameter")
    posted = await api.session.post(
        api.base_url + "/v1/tokens",
        headers={"X-API-Key": api.key},
        data=orjson.dumps({"a": [[[[[]]]]]}),
    )
    assert posted.status == 405
    assert_error(await posted.json(), "method_not_allowed")
    assert posted.headers["Allow"] == "GET,HEAD"


async def test_a_request_line_beyond_the_server_limit_is_400_without_trace(api: Api) -> None:
    """Past 8 KiB the HTTP parser itself refuses the request (before any middleware runs)."""
    response = await api.get("/v1/tokens", sort=_bomb(5_000))
    assert response.status == 400
    text = await response.text()
    assert "Traceback" not in text and "File " not in text


async def test_unencoded_plus_of_an_offset_is_understood(api: Api) -> None:
    response = await api.session.get(
        api.base_url + "/v1/tokens/1/history?from=2017-08-11T00:00:00+00:00&limit=1",
        headers={"X-API-Key": api.key},
    )
    assert response.status == 200
    assert (await response.json())["data"][0]["ts"] == "2017-08-11T00:00:05Z"


async def test_an_internal_error_shows_no_trace(fresh_db_url: str, redis_url: str) -> None:
    conn = await asyncpg.connect(fresh_db_url)
    try:
        await conn.execute(
            "UPDATE token_latest SET sample = '{\"broken\": true}' "
            "WHERE token_id = (SELECT id FROM tokens WHERE cmc_id = 1)"
        )
    finally:
        await conn.close()
    key = await create_key(fresh_db_url, "enterprise")
    async with serve(gateway_settings(fresh_db_url, redis_url), key) as api:
        response = await api.get("/v1/tokens/1")
        assert response.status == 500
        body = await response.json()
        assert_error(body, "internal_error")
        assert response.headers["X-Request-Id"] in body["error"]["message"]
        assert "broken" not in body["error"]["message"]


async def test_postgres_down_is_503_unless_redis_can_answer(
    fresh_db_url: str, redis_url: str, dataset: Dataset
) -> None:
    key = await create_key(fresh_db_url, "enterprise")
    settings = gateway_settings(fresh_db_url, redis_url, db_timeout_seconds=1.0)
    async with serve(settings, key) as api:
        assert (await api.json("/v1/tokens/1"))["meta"]["source"] == "database"
        name = fresh_db_url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(fresh_db_url.rsplit("/", 1)[0] + "/tokvel")
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            started = time.monotonic()
            cached = await api.get("/v1/tokens/1")  # the key was checked: stale use allowed
            assert cached.status == 200
            assert (await cached.json())["meta"]["source"] == "cache"
            for path in ("/v1/tokens/1027", "/v1/tokens/1/history", "/v1/symbols/BTC"):
                response = await api.get(path)
                assert response.status == 503, path
                assert response.headers["Retry-After"] == "5"
                assert_error(await response.json(), "database_unavailable")
            assert time.monotonic() - started < 5
            unknown_key = await api.get("/v1/tokens/1", key=await _unsaved_key())
            assert unknown_key.status == 503
            health = await api.session.get(api.base_url + "/healthz")
            assert health.status == 200
            ready = await api.session.get(api.base_url + "/readyz")
            assert ready.status == 200  # Redis still answers
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
        recovered = await api.get("/v1/tokens/1027")
        assert recovered.status == 200


async def _unsaved_key() -> str:
    from tokvel_common.apikeys import generate_key

    return generate_key()


async def test_freshness_on_every_answer(api: Api, dataset: Dataset) -> None:
    for path in (
        "/v1/tokens",
        "/v1/tokens/1",
        "/v1/tokens/1/velocity",
        "/v1/tokens/1/history",
        "/v1/symbols/BTC",
        "/v1/usage",
    ):
        meta = (await api.json(path))["meta"]
        assert "as_of" in meta and "age_s" in meta, path
        assert meta["age_s"] is not None and meta["age_s"] >= 0
        assert math.isfinite(meta["age_s"])
    csv = await api.get("/v1/tokens/1/history", format="csv")
    assert csv.headers["X-Data-As-Of"] == dataset.newest.isoformat().replace("+00:00", "Z")
    assert float(csv.headers["X-Data-Age-S"]) > 0
