"""Ops endpoints and metrics, dead peers found by heartbeats, key revocation while connected,
graceful shutdown of the served app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.asyncio import Redis

from tests.support.ws import (
    PEPPER,
    eventually,
    make_sample,
    publish,
    receive_json,
    receive_until,
    serve,
)
from tokvel_common.apikeys import announce_key_change, hash_key
from ws_broadcaster.settings import WsSettings

pytestmark = pytest.mark.integration


async def test_healthz_readyz_metrics(make_settings: Callable[..., WsSettings], key: str) -> None:
    async with (
        serve(make_settings()) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        async with session.get(served.http + "/healthz") as response:
            assert response.status == 200
        async with session.get(served.http + "/readyz") as response:
            assert response.status == 200
            assert (await response.json())["checks"] == {"kafka": True, "postgres": True}

        await ws.send_json({"op": "subscribe", "token_ids": [1, 2]})
        await receive_until(ws, lambda r: len(r) == 3)
        await publish(served.settings, [make_sample(1, minute=m) for m in range(5)])
        await receive_until(ws, lambda r: len(r) == 5)

        async with session.get(served.http + "/metrics") as response:
            text = await response.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("ws_connections", ())] == 1
        assert samples[("ws_subscriptions", ())] == 2
        assert samples[("ws_subscribed_tokens", ())] == 2
        assert samples[("ws_messages_sent_total", (("kind", "update"),))] == 5
        assert samples[("ws_messages_sent_total", (("kind", "snapshot"),))] == 2
        assert samples[("ws_records_total", (("outcome", "published"),))] == 5
        assert samples[("ws_delivery_latency_seconds_count", ())] == 5
        assert samples[("ws_delivery_latency_seconds_bucket", (("le", "+Inf"),))] == 5
        assert samples[("ws_connect_attempts_total", (("outcome", "accepted"),))] == 1


async def test_invalid_records_are_skipped(
    make_settings: Callable[..., WsSettings], key: str
) -> None:
    from tests.support.kafka import produce
    from tokvel_common.topics import METRICS, prefixed

    async with (
        serve(make_settings()) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        await ws.send_json({"op": "subscribe", "token_ids": [1]})
        await receive_until(ws, lambda r: len(r) == 2)
        await produce(
            served.settings.kafka_bootstrap_servers,
            prefixed(served.settings.topic_prefix, METRICS),
            [(1, make_sample(1, minute=0).model_copy(update={"trend": "sideways"}))],
        )
        await publish(served.settings, [make_sample(1, minute=1)])
        update = await receive_json(ws)
        assert update["sample"]["ts"][11:16] == "00:01"
        assert served.metric("ws_records_total", outcome="invalid") == 1


async def test_dead_peer_is_closed_by_heartbeat(
    make_settings: Callable[..., WsSettings], key: str, redis: Redis
) -> None:
    async with (
        serve(make_settings(ws_heartbeat_seconds=0.4)) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}, autoping=False) as ws,
    ):
        await ws.send_json({"op": "subscribe", "token_ids": [1]})
        await receive_until(ws, lambda r: len(r) == 2)
        # This client answers no ping: after 0.4 s a ping, after 0.2 s more it is dead.
        await eventually(lambda: served.metric("ws_drops_total", reason="heartbeat_timeout"))
        await eventually(lambda: served.metric("ws_connections") == 0)
        assert await redis.scard("ws_subs:1") == 0


async def test_alive_peer_survives_heartbeats(
    make_settings: Callable[..., WsSettings], key: str
) -> None:
    async with (
        serve(make_settings(ws_heartbeat_seconds=0.2)) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        await ws.send_json({"op": "subscribe", "token_ids": [1]})
        await receive_until(ws, lambda r: len(r) == 2)
        receiving = asyncio.create_task(receive_json(ws, within=5))  # answers pings meanwhile
        await asyncio.sleep(1.0)
        await publish(served.settings, [make_sample(1, minute=1)])
        assert (await receiving)["op"] == "update"
        assert served.metric("ws_drops_total", reason="heartbeat_timeout") == 0


async def test_revocation_closes_open_connections(
    make_settings: Callable[..., WsSettings], key: str, redis_url: str
) -> None:
    async with (
        serve(make_settings()) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        await ws.send_json({"op": "ping"})
        assert (await receive_json(ws))["op"] == "pong"
        client = Redis.from_url(redis_url)
        try:
            # The key change listener subscribes in the background: announce until it hears.
            async def closed() -> bool:
                await announce_key_change(
                    client, hash_key(key, SecretStr(PEPPER.get_secret_value())), "revoked"
                )
                return bool(served.metric("ws_drops_total", reason="key_revoked"))

            await eventually(closed, every=0.2)
        finally:
            await client.aclose()
        message = await ws.receive(timeout=5)
        assert (message.type, message.data, message.extra) == (
            aiohttp.WSMsgType.CLOSE,
            4001,
            "api key revoked",
        )


async def test_graceful_shutdown_says_going_away(
    make_settings: Callable[..., WsSettings], key: str, redis: Redis
) -> None:
    async with aiohttp.ClientSession() as session:
        async with serve(make_settings()) as served:
            clients = [
                await session.ws_connect(served.url, headers={"X-API-Key": key}) for _ in range(3)
            ]
            for ws in clients:
                await ws.send_json({"op": "subscribe", "token_ids": [7]})
                await receive_until(ws, lambda r: len(r) == 2)
            assert await redis.scard("ws_subs:7") == 3
        # serve() has run the app's shutdown: every client was told, nothing is left in Redis.
        for ws in clients:
            message = await ws.receive(timeout=5)
            assert (message.data, message.extra) == (1001, "going away")
            await ws.close()
        assert await redis.scard("ws_subs:7") == 0
        assert not await redis.exists(f"ws_instance:{served.settings.ws_instance_id}")
