"""Hostile and broken clients: random, binary, oversize and invalid frames, floods, bad Origin,
bad keys, limits. Each answered as documented; a survivable mistake never costs the connection."""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support.ws import create_key, receive_json, receive_until, serve
from tokvel_common.apikeys import generate_key
from ws_broadcaster.settings import WsSettings, WsTierLimits

pytestmark = pytest.mark.integration

GENEROUS = WsTierLimits(
    max_subscriptions=20, max_connections=3, messages_per_second=10_000, burst=10_000
)
STRICT = WsTierLimits(max_subscriptions=3, max_connections=2, messages_per_second=5, burst=5)
TIERS = {"basic": STRICT, "pro": GENEROUS}
FRAMES = 300


def _random_frame(rng: random.Random) -> str:
    """Garbage of many shapes: random text, broken JSON, JSON of the wrong shape or op."""
    kind = rng.randrange(8)
    if kind == 0:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(0, 200)))
    if kind == 1:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 50)))
    if kind == 2:
        return orjson.dumps({"op": "subscribe", "token_ids": [1, 2]}).decode()[: rng.randrange(30)]
    if kind == 3:
        return orjson.dumps(rng.choice([[], 1, "x", None, True, [1, 2], 3.5])).decode()
    if kind == 4:
        return orjson.dumps({"op": "".join(rng.choices(string.ascii_letters, k=6))}).decode()
    if kind == 5:
        bad_ids = rng.choice([["1"], [0], [-3], [2**40], [1.5], "all", None, [], [[1]]])
        return orjson.dumps(
            {"op": rng.choice(["subscribe", "unsubscribe"]), "token_ids": bad_ids}
        ).decode()
    if kind == 6:
        return orjson.dumps({"op": "ping", "extra": rng.random()}).decode()
    depth = rng.randrange(1, 60)
    return "[" * depth + "]" * depth


def _expected_codes() -> set[str]:
    return {"invalid_json", "not_an_object", "unknown_op", "invalid_message"}


async def test_random_and_binary_frames_get_errors_and_keep_the_connection(
    make_settings: Callable[..., WsSettings], key: str
) -> None:
    rng = random.Random(20240101)
    async with (
        serve(make_settings(ws_tiers=TIERS)) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        for _ in range(FRAMES):
            await ws.send_str(_random_frame(rng))
        for _ in range(20):
            await ws.send_bytes(rng.randbytes(rng.randrange(0, 500)))
        answers = await receive_until(ws, lambda r: len(r) == FRAMES + 20)
        assert {a["op"] for a in answers} == {"error"}
        codes = [a["code"] for a in answers]
        assert set(codes[:FRAMES]) <= _expected_codes()
        assert set(codes[:FRAMES]) == _expected_codes()  # every kind of mistake was exercised
        assert set(codes[FRAMES:]) == {"binary_not_supported"}
        # Still a working connection.
        await ws.send_json({"op": "ping", "id": "alive"})
        assert await receive_json(ws) == {"op": "pong", "id": "alive"}
        assert served.metric("ws_client_errors_total", code="binary_not_supported") == 20
        assert served.metric("ws_drops_total", reason="protocol_error") == 0


async def test_oversize_frame_closes_with_1009(
    make_settings: Callable[..., WsSettings], key: str
) -> None:
    async with (
        serve(make_settings(ws_max_message_bytes=1024)) as served,
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(served.url, headers={"X-API-Key": key}) as ws:
            await ws.send_str("x" * 1000)  # below: an error answer
            assert (await receive_json(ws))["code"] == "invalid_json"
            await ws.send_str(orjson.dumps({"op": "ping", "pad": "y" * 2000}).decode())
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert message.data == 1009
        async with session.ws_connect(served.url, headers={"X-API-Key": key}) as ws:
            await ws.send_bytes(b"\x00" * 5000)
            assert (await ws.receive(timeout=5)).data == 1009
        assert served.metric("ws_drops_total", reason="message_too_big") == 2


async def test_invalid_utf8_text_frame_fails_the_connection(
    make_settings: Callable[..., WsSettings], key: str
) -> None:
    async with (
        serve(make_settings()) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        await ws.send_frame(b'{"op": "\xff\xfe"}', aiohttp.WSMsgType.TEXT)
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == 1007  # RFC 6455: invalid UTF-8 in a text frame
        assert served.metric("ws_drops_total", reason="protocol_error") == 1


async def test_flood_is_rate_limited_then_closed(
    make_settings: Callable[..., WsSettings], database_url: str
) -> None:
    basic = await create_key(database_url, tier="basic")
    async with (
        serve(make_settings(ws_tiers=TIERS, ws_rate_limit_strikes=10)) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": basic}) as ws,
    ):
        for n in range(100):
            await ws.send_json({"op": "ping", "id": n})
        answers: list[Any] = []
        while (message := await ws.receive(timeout=5)).type is aiohttp.WSMsgType.TEXT:
            answers.append(orjson.loads(message.data))
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert (message.data, message.extra) == (1008, "message rate exceeded")
        pongs = [a for a in answers if a["op"] == "pong"]
        limited = [a for a in answers if a.get("code") == "rate_limited"]
        assert 5 <= len(pongs) <= 7  # the burst (and what refilled meanwhile)
        assert len(limited) == 9  # the tenth strike closes instead of answering
        assert served.metric("ws_drops_total", reason="rate_limit") == 1


async def test_subscription_and_connection_limits(
    make_settings: Callable[..., WsSettings], database_url: str
) -> None:
    basic = await create_key(database_url, tier="basic")
    headers = {"X-API-Key": basic}
    async with (
        serve(make_settings(ws_tiers=TIERS)) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers=headers) as first,
        session.ws_connect(served.url, headers=headers) as second,
    ):
        await first.send_json({"op": "subscribe", "token_ids": [1, 2, 3, 4], "id": "big"})
        error = await receive_json(first)
        assert (error["code"], error["id"], error["token_ids"]) == (
            "too_many_subscriptions",
            "big",
            [1, 2, 3, 4],
        )
        await first.send_json({"op": "subscribe", "token_ids": [1, 2]})
        await receive_until(first, lambda r: len(r) == 3)
        await first.send_json({"op": "subscribe", "token_ids": [2, 3, 4]})
        assert (await receive_json(first))["code"] == "too_many_subscriptions"
        await first.send_json({"op": "subscribe", "token_ids": [2, 3]})  # one new: fits
        subscribed = await receive_json(first)
        assert subscribed["token_ids"] == [2, 3]

        # Third connection of a key whose tier allows two.
        async with session.ws_connect(served.url, headers=headers) as third:
            message = await third.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert message.data == 4029
            assert "2 connections per key" in (message.extra or "")
        await second.close()

        async def admitted() -> bool:
            async with session.ws_connect(served.url, headers=headers) as again:
                await again.send_json({"op": "ping"})
                reply = await again.receive(timeout=5)
                return reply.type is aiohttp.WSMsgType.TEXT

        # A closed connection's place is given back (through Redis, on this instance's detach).
        for _ in range(50):
            if await admitted():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the closed connection's place was not released")


@pytest.mark.parametrize(
    ("headers", "params", "reason"),
    [
        ({}, {}, "missing api key"),
        ({"X-API-Key": "not-a-key"}, {}, "invalid api key"),
        ({"X-API-Key": generate_key()}, {}, "invalid api key"),  # well-formed, unknown
        ({}, {"api_key": "tvk_" + "A" * 39}, "invalid api key"),  # bad checksum
    ],
)
async def test_bad_keys_close_with_4001(
    make_settings: Callable[..., WsSettings],
    headers: dict[str, str],
    params: dict[str, str],
    reason: str,
) -> None:
    async with (
        serve(make_settings()) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers=headers, params=params) as ws,
    ):
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == 4001
        assert (message.extra or "").startswith(reason)
        assert served.metric("ws_connect_attempts_total", outcome="unauthorized") == 1


async def test_revoked_key_closes_with_4001(
    make_settings: Callable[..., WsSettings], database_url: str, key: str
) -> None:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE api_keys SET is_active = false, revoked_at = now()")
    finally:
        await conn.close()
    async with (
        serve(make_settings()) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        message = await ws.receive(timeout=5)
        assert (message.data, message.extra) == (4001, "api key revoked")


async def test_origin_allow_list(make_settings: Callable[..., WsSettings], key: str) -> None:
    settings = make_settings(ws_allowed_origins=["https://app.example.com"])
    headers = {"X-API-Key": key}
    async with serve(settings) as served, aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(served.url, headers=headers, origin="https://evil.example")
        assert refused.value.status == 403
        async with session.ws_connect(
            served.url, headers=headers, origin="https://app.example.com"
        ) as ws:
            await ws.send_json({"op": "ping"})
            assert (await receive_json(ws))["op"] == "pong"
        async with session.ws_connect(served.url, headers=headers) as ws:  # no Origin: no browser
            await ws.send_json({"op": "ping"})
            assert (await receive_json(ws))["op"] == "pong"
        async with session.get(served.http + "/v1/ws", headers=headers) as response:
            assert response.status == 426
        assert served.metric("ws_connect_attempts_total", outcome="origin_rejected") == 1
