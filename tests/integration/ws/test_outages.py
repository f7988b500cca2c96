"""Redis and PostgreSQL outages: updates keep flowing (they come from Kafka), snapshots fall
back to PostgreSQL, then to what the instance has read, then to a clear error; the Redis
registry is reconciled when Redis comes back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.support.tcp_proxy import TcpProxy
from tests.support.ws import eventually, make_sample, publish, receive_json, receive_until, serve
from tokvel_common.cache import TokenMetadata, TokenSnapshot, encode_value, token_key
from ws_broadcaster.settings import WsSettings

pytestmark = pytest.mark.integration


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}"))


async def _proxy(url: str) -> TcpProxy:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    await proxy.start()
    return proxy


@pytest.fixture
async def proxies(database_url: str, redis_url: str) -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    pg, rd = await _proxy(database_url), await _proxy(redis_url)
    try:
        yield pg, rd
    finally:
        await pg.cut()
        await rd.cut()


async def test_storage_outages(
    make_settings: Callable[..., WsSettings],
    key: str,
    database_url: str,
    redis_url: str,
    redis: Redis,
    proxies: tuple[TcpProxy, TcpProxy],
) -> None:
    pg, rd = proxies
    settings = make_settings(
        database_url=_via(database_url, pg.port),
        redis_url=urlunsplit(urlsplit(redis_url)._replace(netloc=f"127.0.0.1:{rd.port}")),
        ws_redis_timeout_seconds=0.3,
        ws_db_timeout_seconds=1.0,
        ws_snapshot_timeout_seconds=2.0,
        api_key_cache_ttl_seconds=5.0,
    )
    cached = TokenSnapshot(token=TokenMetadata(cmc_id=3), metrics=make_sample(3, minute=0))
    await redis.set(token_key(3), encode_value(cached), ex=60)
    async with (
        serve(settings) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        await ws.send_json({"op": "subscribe", "token_ids": [3]})
        _, snapshot = await receive_until(ws, lambda r: len(r) == 2)
        assert snapshot["sample"]["cmc_id"] == 3

        # Redis down: the snapshot comes from PostgreSQL (which does not know token 4: null).
        await rd.cut()
        await ws.send_json({"op": "subscribe", "token_ids": [4]})
        subscribed, snapshot = await receive_until(ws, lambda r: len(r) == 2)
        assert subscribed["token_ids"] == [4]
        assert (snapshot["token"], snapshot["sample"]) == (None, None)
        assert served.metric("ws_snapshot_lookups_total", source="none") == 1

        # PostgreSQL down too: a token this instance has read still gets a snapshot from
        # memory; one it knows nothing of is refused with snapshot_unavailable.
        await pg.cut()
        await publish(settings, [make_sample(3, minute=1), make_sample(5, minute=1)])
        update = await receive_json(ws)
        assert (update["op"], update["token_id"]) == ("update", 3)  # Kafka is not affected
        await eventually(lambda: served.broadcaster.buffer.newest(5) is not None)
        await ws.send_json({"op": "subscribe", "token_ids": [5, 6], "id": "x"})
        subscribed, snapshot, error = await receive_until(ws, lambda r: len(r) == 3)
        assert subscribed["token_ids"] == [5]
        assert (snapshot["token_id"], snapshot["token"]) == (5, None)
        assert snapshot["sample"]["ts"][11:16] == "00:01"
        assert snapshot["seq"] is not None
        assert (error["code"], error["token_ids"], error["id"]) == (
            "snapshot_unavailable",
            [6],
            "x",
        )
        async with session.get(served.http + "/readyz") as response:
            assert response.status == 503

        # Both back: the registry, which missed the subscriptions of 4 and 5, is reconciled.
        await rd.start()
        await pg.start()

        async def registered() -> bool:
            sizes = [await redis.scard(f"ws_subs:{t}") for t in (3, 4, 5, 6)]
            return sizes == [1, 1, 1, 0]

        await eventually(registered, within=10)
        assert served.metric("ws_redis_errors_total", operation="write") >= 1
