"""WebSocket abuse against the running broadcaster, its memory measured (peak RSS from /proc).

- Clients that subscribe and never read, while updates flow: each is dropped (4008, counted as
  ``slow_consumer``), a reading client still gets every update, and the broadcaster's memory
  stays within what its per-connection bounds allow (send queue of shared frames, transport
  buffer), however much is published.
- Oversized frames from many clients at once: each closed with 1009 at the frame header, never
  buffered.
- Message floods: past the tier's burst every message is answered ``rate_limited``; after
  ``WS_RATE_LIMIT_STRIKES`` in a row the connection is closed with 1008.
- A foreign ``Origin``: 403 before any upgrade.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import aiohttp
import pytest

from tests.abuse.conftest import Figures, Scale
from tests.abuse.stack import ALLOWED_ORIGIN, AbuseStack
from tests.abuse.support import CHUNK, MiB, format_ms, open_websocket, peak_growth
from tests.support.ws import eventually, make_sample, publish

pytestmark = pytest.mark.abuse

TOKEN: Final = 1
# About 3 KB per update (the flags pad it): UPDATES of them are several times what a silent
# client's buffers (kernel, transport, send queue of 512) can hold, so every one is dropped.
FLAGS: Final = [f"flag-{n:03d}-" + "x" * 80 for n in range(30)]
UPDATES: Final = 1_500
PUBLISH_CHUNK: Final = 50
PUBLISH_PAUSE_SECONDS: Final = 0.05
SILENT_RECEIVE_BUFFER: Final = 4096
# Per silent client: the transport's 64 KiB high-water mark plus a frame, the queue's
# references and the connection's objects; the frames themselves are shared by all clients.
MEMORY_PER_CONNECTION: Final = 256 * 1024
MEMORY_FIXED: Final = 48 * MiB
FLOOD_MESSAGES: Final = 2_000
CLOSE_BOUND_SECONDS: Final = 10.0
TEN_MIB: Final = 10 * MiB


async def _metric(stack: AbuseStack, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session:
        return await stack.ws.metric(session, name, **labels)


async def _eventually_metric(
    stack: AbuseStack, name: str, at_least: float, within: float = 30.0, **labels: str
) -> float:
    async def reached() -> float | None:
        value = await _metric(stack, name, **labels)
        return value if value >= at_least else None

    value: float = await eventually(reached, within=within, every=0.2)
    return value


def _memory_figure(figures: Figures, label: str, growth: int, bound: int) -> bool:
    return figures.add(
        f"broadcaster: peak RSS growth, {label}",
        f"{growth / MiB:.1f} MiB",
        f"<= {bound / MiB:.1f} MiB",
        growth <= bound,
    )


@pytest.mark.timeout(300)
async def test_never_reading_clients_are_dropped_in_bounded_memory(
    stack: AbuseStack, scale: Scale, figures: Figures
) -> None:
    key = await stack.new_key()
    silent_count = scale.ws_silent_clients
    subscribe = b'{"op": "subscribe", "token_ids": [%d]}' % TOKEN
    dropped_before = await _metric(stack, "ws_drops_total", reason="slow_consumer")
    subscriptions_before = await _metric(stack, "ws_subscriptions")
    silent = []
    for _ in range(silent_count):
        status, ws = await open_websocket(stack.ws_url, key, receive_buffer=SILENT_RECEIVE_BUFFER)
        assert status == 101
        await ws.send_text(subscribe)
        silent.append(ws)
    async with aiohttp.ClientSession() as session:
        reader = await session.ws_connect(stack.ws_url, headers={"X-API-Key": key})
        await reader.send_str(subscribe.decode())
        await _eventually_metric(stack, "ws_subscriptions", subscriptions_before + silent_count + 1)
        stack.ws.reset_peak()
        settings = stack.settings.model_copy(update={"topic_prefix": stack.topic_prefix})
        samples = [make_sample(TOKEN, minute=m, quality_flags=FLAGS) for m in range(UPDATES)]
        publishing = asyncio.create_task(
            publish(settings, samples, chunk=PUBLISH_CHUNK, pause_seconds=PUBLISH_PAUSE_SECONDS)
        )
        received: list[str] = []
        async with asyncio.timeout(120):
            while len(received) < UPDATES:
                message = await reader.receive_json()
                if message["op"] == "update":
                    received.append(message["sample"]["ts"])
        await publishing
        dropped = (
            await _eventually_metric(
                stack,
                "ws_drops_total",
                dropped_before + silent_count,
                reason="slow_consumer",
            )
            - dropped_before
        )
        growth = peak_growth(stack.ws)
        rss_after, _ = stack.ws.memory()
        await reader.close()
    # What a silent client finds once it reads: the close frame, or a reset if the server
    # had to abort the socket after it (the client never answered the closing handshake).
    codes = await asyncio.gather(*(ws.receive_close_code() for ws in silent))
    for ws in silent:
        ws.abort()

    bound = MEMORY_FIXED + silent_count * MEMORY_PER_CONNECTION
    in_order = received == [s.ts.isoformat() for s in samples]
    figures.add(
        f"broadcaster: {silent_count} never-reading clients, {UPDATES} updates of ~3 KB",
        f"{dropped:.0f} dropped (4008: {codes.count(4008)}, reset: {codes.count(None)}), "
        f"reader got {len(received)}/{UPDATES}",
        "all dropped, reader all in order",
        dropped == silent_count and in_order,
    )
    _memory_figure(figures, f"{silent_count} never-reading clients", growth, bound)
    assert dropped == silent_count
    assert set(codes) <= {4008, None}, codes
    assert in_order
    assert growth <= bound, f"peak grew {growth} bytes; RSS after {rss_after}"


@pytest.mark.timeout(300)
async def test_oversize_frames_close_1009_without_buffering(
    stack: AbuseStack, scale: Scale, figures: Figures
) -> None:
    key = await stack.new_key()
    count = scale.ws_oversize_clients
    frame = b"x" * TEN_MIB
    sockets = []
    for _ in range(count):
        status, ws = await open_websocket(stack.ws_url, key)
        assert status == 101
        sockets.append(ws)
    stack.ws.reset_peak()
    started = time.perf_counter()
    await asyncio.gather(*(ws.send_prefix(frame, CHUNK) for ws in sockets))
    codes = await asyncio.gather(*(ws.receive_close_code() for ws in sockets))
    seconds = time.perf_counter() - started
    growth = peak_growth(stack.ws)
    for ws in sockets:
        ws.abort()
    figures.add(
        f"broadcaster: {count} clients announcing 10 MiB frames at once",
        f"{codes.count(1009)}/{count} closed 1009 in {format_ms(seconds)}",
        f"all, within {CLOSE_BOUND_SECONDS:g} s",
        codes.count(1009) == count and seconds <= CLOSE_BOUND_SECONDS,
    )
    _memory_figure(figures, f"{count} x 10 MiB frames", growth, MEMORY_FIXED)
    assert codes.count(1009) == count, codes
    assert seconds <= CLOSE_BOUND_SECONDS
    assert growth <= MEMORY_FIXED


@pytest.mark.timeout(300)
async def test_message_floods_are_cut_off_with_1008(
    stack: AbuseStack, scale: Scale, figures: Figures
) -> None:
    key = await stack.new_key()
    count = scale.ws_flooders
    closed_before = await _metric(stack, "ws_drops_total", reason="rate_limit")
    sockets = []
    for _ in range(count):
        status, ws = await open_websocket(stack.ws_url, key)
        assert status == 101
        sockets.append(ws)
    stack.ws.reset_peak()
    started = time.perf_counter()
    for ws in sockets:
        for _ in range(FLOOD_MESSAGES):
            ws.send_nowait(b'{"op": "ping"}')
    codes = await asyncio.gather(*(ws.receive_close_code() for ws in sockets))
    seconds = time.perf_counter() - started
    growth = peak_growth(stack.ws)
    for ws in sockets:
        ws.abort()
    cut_off = await _eventually_metric(
        stack, "ws_drops_total", closed_before + count, reason="rate_limit"
    )
    figures.add(
        f"broadcaster: {count} clients flooding {FLOOD_MESSAGES} messages each",
        f"{codes.count(1008)}/{count} closed 1008 in {format_ms(seconds)}",
        f"all, within {CLOSE_BOUND_SECONDS:g} s",
        codes.count(1008) == count and seconds <= CLOSE_BOUND_SECONDS,
    )
    _memory_figure(figures, f"{count} flooders", growth, MEMORY_FIXED)
    assert codes.count(1008) == count, codes
    assert cut_off - closed_before == count
    assert seconds <= CLOSE_BOUND_SECONDS
    assert growth <= MEMORY_FIXED


async def test_foreign_origins_are_refused_before_the_upgrade(
    stack: AbuseStack, figures: Figures
) -> None:
    key = await stack.new_key()
    port = stack.gateway.base_url.rsplit(":", 1)[1]
    foreign = [
        "http://evil.example",
        "null",
        f"http://127.0.0.1:{port}.evil.example",
        f"https://127.0.0.1:{port}",
        f"http://127.0.0.1:{int(port) + 1}",
    ]
    allowed = [ALLOWED_ORIGIN, ALLOWED_ORIGIN.upper(), ALLOWED_ORIGIN + "/"]
    statuses = {}
    for origin in foreign + allowed:
        status, ws = await open_websocket(stack.ws_url, key, origin=origin)
        statuses[origin] = status
        ws.abort()
    refused = [o for o in foreign if statuses[o] == 403]
    admitted = [o for o in allowed if statuses[o] == 101]
    figures.add(
        "broadcaster: foreign Origin refused (403), the allowed one admitted (101)",
        f"{len(refused)}/{len(foreign)} refused, {len(admitted)}/{len(allowed)} admitted",
        "all",
        len(refused) == len(foreign) and len(admitted) == len(allowed),
    )
    assert refused == foreign, statuses
    assert admitted == allowed, statuses
