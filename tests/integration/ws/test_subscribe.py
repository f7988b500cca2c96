"""Subscribe → snapshot → updates for exactly the subscribed tokens, on a served app with real
Kafka, PostgreSQL and Redis; unsubscribe and disconnect clean ws_subs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from tests.support.ws import (
    eventually,
    make_sample,
    publish,
    receive_json,
    receive_until,
    serve,
)
from tokvel_common.cache import TokenMetadata, TokenSnapshot, encode_value, token_key
from tokvel_common.events import MetricsSample
from ws_broadcaster.settings import WsSettings

pytestmark = pytest.mark.integration


async def _store_in_postgres(database_url: str, sample: MetricsSample) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        token_id = await conn.fetchval(
            "INSERT INTO tokens (cmc_id, symbol, name, slug) VALUES ($1, $2, $3, $4) RETURNING id",
            sample.cmc_id,
            sample.symbol,
            sample.name,
            sample.slug,
        )
        await conn.execute(
            'INSERT INTO token_latest (token_id, "timestamp", cmc_rank, market_cap_usd, sample) '
            "VALUES ($1, $2, $3, $4, $5::jsonb)",
            token_id,
            sample.ts,
            sample.cmc_rank,
            sample.market_cap_usd,
            sample.model_dump_json(),
        )
    finally:
        await conn.close()


async def _members(redis: Redis, key: str) -> set[str]:
    return {m.decode() if isinstance(m, bytes) else m for m in await redis.smembers(key)}


def _updates(messages: list[Any]) -> list[tuple[int, int]]:
    return [(m["token_id"], m["seq"]) for m in messages if m["op"] == "update"]


async def test_subscribe_snapshot_then_only_subscribed_updates(
    make_settings: Callable[..., WsSettings], key: str, database_url: str, redis: Redis
) -> None:
    cached = TokenSnapshot(
        token=TokenMetadata(cmc_id=1, symbol="BTC", name="Bitcoin", slug="bitcoin"),
        metrics=make_sample(1, minute=0, symbol="BTC"),
    )
    await redis.set(token_key(1), encode_value(cached), ex=60)
    await _store_in_postgres(database_url, make_sample(1027, minute=0, symbol="ETH"))

    async with (
        serve(make_settings()) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        await ws.send_json({"op": "subscribe", "token_ids": [1, 1027, 52, 1], "id": "s1"})
        first = await receive_until(ws, lambda r: len(r) == 4)
        assert first[0] == {
            "op": "subscribed",
            "id": "s1",
            "token_ids": [1, 1027, 52],
            "resumed": [],
        }
        snapshots = {m["token_id"]: m for m in first[1:]}
        assert {m["op"] for m in first[1:]} == {"snapshot"}
        assert snapshots[1]["token"]["symbol"] == "BTC"  # from Redis
        assert snapshots[1]["sample"]["symbol"] == "BTC"
        assert snapshots[1027]["sample"]["symbol"] == "ETH"  # from PostgreSQL
        assert snapshots[1027]["token"]["cmc_id"] == 1027
        assert snapshots[52]["token"] is None and snapshots[52]["sample"] is None  # unknown yet
        assert all(m["seq"] is None and m["reason"] == "subscribe" for m in snapshots.values())
        assert served.metric("ws_snapshot_lookups_total", source="redis") == 1
        assert served.metric("ws_snapshot_lookups_total", source="postgres") == 1

        conn_ids = await _members(redis, "ws_subs:1")
        assert len(conn_ids) == 1
        (conn_id,) = conn_ids
        assert conn_id.startswith(served.settings.ws_instance_id + ":")
        assert await _members(redis, "ws_subs:52") == {conn_id}

        # Interleaved samples of subscribed and unsubscribed tokens.
        await publish(
            served.settings,
            [make_sample(t, minute=m) for m in (1, 2, 3) for t in (1, 1027, 99, 52)],
        )
        received = await receive_until(ws, lambda r: len(r) == 9)
        assert {m["op"] for m in received} == {"update"}
        assert {m["token_id"] for m in received} == {1, 1027, 52}
        for token in (1, 1027, 52):
            mine = [m for m in received if m["token_id"] == token]
            assert [m["sample"]["ts"][11:16] for m in mine] == ["00:01", "00:02", "00:03"]
            seqs = [m["seq"] for m in mine]
            assert seqs == sorted(seqs) and len(set(seqs)) == 3

        await ws.send_json({"op": "unsubscribe", "token_ids": [1027, 52], "id": 2})
        assert await receive_json(ws) == {
            "op": "unsubscribed",
            "id": 2,
            "token_ids": [1027, 52],
        }
        assert await _members(redis, "ws_subs:1027") == set()
        await publish(served.settings, [make_sample(1027, minute=4), make_sample(1, minute=4)])
        after = await receive_json(ws)
        assert (after["token_id"], after["sample"]["ts"][11:16]) == (1, "00:04")

        # A later subscriber's snapshot is the newest the instance has read, with its seq.
        async with session.ws_connect(served.url, params={"api_key": key}) as other:
            await other.send_json({"op": "subscribe", "token_ids": [1]})
            _, snapshot = await receive_until(other, lambda r: len(r) == 2)
            assert snapshot["sample"]["ts"][11:16] == "00:04"
            assert snapshot["token"]["symbol"] == "BTC"
            assert snapshot["seq"] == after["seq"]
            assert len(await _members(redis, "ws_subs:1")) == 2
            await publish(served.settings, [make_sample(1, minute=5)])
            update = await receive_json(other)
            assert update["op"] == "update" and update["seq"] > snapshot["seq"]

        # The server cleans up after the closing handshake: shortly after the client is done.
        async def only_first() -> bool:
            return await _members(redis, "ws_subs:1") == {conn_id}

        await eventually(only_first)
        assert served.metric("ws_connections") == 1

    # Disconnect (and graceful stop) leave nothing behind.
    for token in (1, 1027, 52):
        assert await _members(redis, f"ws_subs:{token}") == set()
    assert not [k async for k in redis.scan_iter("ws_conns:*")]


async def test_ping_pong_and_request_ids(
    make_settings: Callable[..., WsSettings], key: str
) -> None:
    async with (
        serve(make_settings()) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        await ws.send_str(orjson.dumps({"op": "ping", "id": "abc"}).decode())
        assert await receive_json(ws) == {"op": "pong", "id": "abc"}
        await ws.send_json({"op": "ping"})
        assert await receive_json(ws) == {"op": "pong", "id": None}
