"""Keys of open connections re-verified every API_KEY_CACHE_TTL_SECONDS, with no announcement
(it was lost: Redis down at that moment): revoked or rotated in PostgreSQL only, the key's
sockets are closed with 4001 within the TTL plus one re-check interval; PostgreSQL down during a
re-check leaves them open, and the first re-check after it is back closes them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from tests.support.tcp_proxy import TcpProxy
from tests.support.ws import PEPPER, create_key, eventually, receive_json, serve
from tokvel_common.apikeys import display_prefix, generate_key, hash_key
from ws_broadcaster.settings import WsSettings

pytestmark = pytest.mark.integration

TTL_SECONDS: Final = 1.0
# The cache may answer from memory for a TTL after the revocation, then the next re-check
# (one interval, the TTL) looks it up; the margin is for a contended CPU.
CLOSED_WITHIN_SECONDS: Final = 2 * TTL_SECONDS + 3.0


async def _execute(database_url: str, query: str, *args: object) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


async def _close_of(ws: aiohttp.ClientWebSocketResponse, within: float) -> tuple[int, str | None]:
    message = await ws.receive(timeout=within)
    assert message.type is aiohttp.WSMsgType.CLOSE, message
    return message.data, message.extra


async def _answers_ping(ws: aiohttp.ClientWebSocketResponse) -> bool:
    await ws.send_json({"op": "ping"})
    return bool((await receive_json(ws, within=5))["op"] == "pong")


async def test_keys_ended_in_postgres_only_close_their_sockets(
    make_settings: Callable[..., WsSettings], database_url: str
) -> None:
    kept, revoked, rotated = [await create_key(database_url, tier="pro") for _ in range(3)]
    settings = make_settings(api_key_cache_ttl_seconds=TTL_SECONDS)
    async with serve(settings) as served, aiohttp.ClientSession() as session:
        sockets = {
            key: [
                await session.ws_connect(served.url, headers={"X-API-Key": key}) for _ in range(2)
            ]
            for key in (kept, revoked, rotated)
        }
        for ws in sockets[revoked] + sockets[rotated]:
            assert await _answers_ping(ws)

        ended_at = time.monotonic()
        await _execute(
            database_url,
            "UPDATE api_keys SET is_active = false, revoked_at = now() WHERE key_hash = $1",
            hash_key(revoked, PEPPER),
        )
        new_key = generate_key()
        await _execute(
            database_url,
            "UPDATE api_keys SET key_hash = $2, key_prefix = $3 WHERE key_hash = $1",
            hash_key(rotated, PEPPER),
            hash_key(new_key, PEPPER),
            display_prefix(new_key),
        )
        closes = [await _close_of(ws, CLOSED_WITHIN_SECONDS) for ws in sockets[revoked]]
        closes += [await _close_of(ws, CLOSED_WITHIN_SECONDS) for ws in sockets[rotated]]
        closed_after = time.monotonic() - ended_at

        assert closes == [(4001, "api key revoked")] * 2 + [(4001, "api key rotated")] * 2
        assert closed_after <= CLOSED_WITHIN_SECONDS
        # One re-check per key, not per connection: two keys ended, four sockets closed.
        assert served.metric("ws_key_rechecks_total", outcome="ended") == 2
        assert served.metric("ws_drops_total", reason="key_revoked") == 4
        for ws in sockets[kept]:
            assert await _answers_ping(ws)
            await ws.close()


async def test_postgres_down_during_a_recheck_leaves_sockets_open(
    make_settings: Callable[..., WsSettings], database_url: str
) -> None:
    key = await create_key(database_url, tier="pro")
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
    await proxy.start()
    via_proxy = urlunsplit(
        parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}")
    )
    settings = make_settings(
        database_url=via_proxy, api_key_cache_ttl_seconds=TTL_SECONDS, ws_db_timeout_seconds=1.0
    )
    try:
        async with (
            serve(settings) as served,
            aiohttp.ClientSession() as session,
            session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
        ):
            assert await _answers_ping(ws)
            # Revoked, but PostgreSQL cannot be reached to say so: the socket stays.
            await _execute(
                database_url,
                "UPDATE api_keys SET is_active = false, revoked_at = now() WHERE key_hash = $1",
                hash_key(key, PEPPER),
            )
            await proxy.cut()
            await eventually(
                lambda: served.metric("ws_key_rechecks_total", outcome="unavailable") >= 2,
                within=30,
            )
            assert await _answers_ping(ws)
            assert served.metric("ws_drops_total", reason="key_revoked") == 0

            await proxy.start()
            assert await _close_of(ws, CLOSED_WITHIN_SECONDS + 5) == (4001, "api key revoked")
            assert served.metric("ws_key_rechecks_total", outcome="ended") == 1
    finally:
        await proxy.cut()
