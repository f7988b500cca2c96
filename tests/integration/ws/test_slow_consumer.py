"""A client that does not read is dropped (4008, counted) while 100 others get every update.

The broadcaster runs as a real process (its own CPU), the 101 clients in the test; the
non-reading client's socket has a small receive buffer, and the server's per-client send buffer
is small, so its bounded queue fills after a few hundred kilobytes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohappyeyeballs import AddrInfoType
from redis.asyncio import Redis

from tests.support.ws import (
    create_key,
    eventually,
    make_sample,
    publish,
    receive_until,
    running_instance,
)
from ws_broadcaster.settings import WsSettings

pytestmark = pytest.mark.integration

READERS = 100
UPDATES = 300
# About 3 KB per update: 300 of them are ~900 KB, several times what the non-reading client's
# buffers (kernel, transport, queue) can hold.
FLAGS = [f"flag-{n:03d}-" + "x" * 80 for n in range(30)]


def _small_receive_buffer(addr_info: AddrInfoType) -> socket.socket:
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_non_reading_client_is_dropped_without_slowing_the_others(
    make_settings: Callable[..., WsSettings], database_url: str, redis: Redis, tmp_path: Path
) -> None:
    key = await create_key(database_url, tier="enterprise")  # 101 connections on one key
    settings = make_settings(
        ws_send_queue_size=64,
        ws_socket_send_buffer_bytes=4096,
        ws_heartbeat_seconds=60.0,  # the dropped client must be dropped as slow, not as dead
    )
    headers = {"X-API-Key": key}
    async with (
        running_instance(settings, tmp_path / "ws.log") as instance,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(socket_factory=_small_receive_buffer)
        ) as slow_session,
    ):
        slow = await slow_session.ws_connect(instance.url, headers=headers)
        await slow.send_json({"op": "subscribe", "token_ids": [1]})
        await receive_until(slow, lambda r: len(r) == 2)
        readers = [await session.ws_connect(instance.url, headers=headers) for _ in range(READERS)]
        for ws in readers:
            await ws.send_json({"op": "subscribe", "token_ids": [1]})
        await asyncio.gather(*(receive_until(ws, lambda r: len(r) == 2) for ws in readers))
        await eventually(lambda: _scard_is(redis, "ws_subs:1", READERS + 1))

        samples = [make_sample(1, minute=m, quality_flags=FLAGS) for m in range(UPDATES)]
        # Paced like a live feed (a burst larger than a client's buffers would drop everyone
        # who cannot read it at once, by design): 20 updates every 0.1 s.
        publishing = asyncio.create_task(publish(settings, samples, chunk=20, pause_seconds=0.1))
        results = await asyncio.gather(
            *(receive_until(ws, lambda r: len(r) == UPDATES, within=60) for ws in readers)
        )
        await publishing
        expected = [s.ts.isoformat() for s in samples]
        for received in results:
            assert [m["sample"]["ts"] for m in received] == expected

        metrics = await (await session.get(instance.http + "/metrics")).text()
        assert 'ws_drops_total{reason="slow_consumer"} 1.0' in metrics
        assert "ws_drops_total{" not in metrics.replace(
            'ws_drops_total{reason="slow_consumer"}', ""
        )
        # The dropped one is gone from ws_subs.
        await eventually(lambda: _scard_is(redis, "ws_subs:1", READERS))

        # The dropped client, once it reads again, gets what was buffered, then the 4008 close
        # frame, or the reset that followed it if it came too late to read that.
        async with asyncio.timeout(15):
            while (message := await slow.receive()).type is aiohttp.WSMsgType.TEXT:
                pass
        if message.type is aiohttp.WSMsgType.CLOSE:
            assert (message.data, message.extra) == (4008, "send queue full")
        else:
            assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        for ws in [*readers, slow]:
            await ws.close()


async def _scard_is(redis: Redis, key: str, size: int) -> bool:
    return bool(await redis.scard(key) == size)
