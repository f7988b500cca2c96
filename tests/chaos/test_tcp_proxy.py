"""The proxy's blackhole (tests.support.tcp_proxy): silence both ways, then broken connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.support.tcp_proxy import TcpProxy

SILENCE_SECONDS = 0.5  # how long "no answer" is waited for
ANSWER_SECONDS = 30.0  # an answer through a working proxy, on a busy machine


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    proxy = TcpProxy("127.0.0.1", server.sockets[0].getsockname()[1])
    await proxy.start()
    yield proxy
    await proxy.cut()
    server.close()
    await server.wait_closed()


async def _round_trip(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], within: float = ANSWER_SECONDS
) -> bytes:
    reader, writer = connection
    writer.write(b"ping")
    await writer.drain()
    return await asyncio.wait_for(reader.read(1024), within)


async def test_a_blackhole_answers_nothing_and_breaks_the_connections_it_silenced(
    proxy: TcpProxy,
) -> None:
    old = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await _round_trip(old) == b"ping"

    proxy.blackhole()
    with pytest.raises(TimeoutError):
        await _round_trip(old, SILENCE_SECONDS)
    during = await asyncio.open_connection("127.0.0.1", proxy.port)  # accepted, never answered
    with pytest.raises(TimeoutError):
        await _round_trip(during, SILENCE_SECONDS)

    proxy.heal()
    for reader, writer in (old, during):
        # The bytes lost meanwhile broke these streams: they are reset, never resumed.
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(1024), ANSWER_SECONDS) == b""
        writer.close()
    fresh = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await _round_trip(fresh) == b"ping"
    fresh[1].close()
