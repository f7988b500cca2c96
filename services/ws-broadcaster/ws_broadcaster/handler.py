"""``GET /v1/ws``: origin check, upgrade, API key, per-key admission, then the receive loop.

Before the upgrade: an Origin outside ``WS_ALLOWED_ORIGINS`` gets 403 (a browser page of a
foreign site never gets a socket); a request that is not a WebSocket upgrade gets 426.
After it, failures are close frames, which every client (browsers included) can read:
4001 missing/invalid/revoked key, 1013 keys cannot be checked now, 4029 too many connections
for the key. In the loop: a frame over ``WS_MAX_MESSAGE_BYTES`` closes with 1009; a binary frame,
invalid JSON or an unknown op is answered with an ``error`` and the connection stays; a client
above its tier's message rate gets ``rate_limited`` errors and, if it keeps on, 1008.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Final

from aiohttp import WebSocketError, WSCloseCode, WSMessage, WSMsgType, hdrs, web

from ws_broadcaster.auth import API_KEY_HEADER, API_KEY_QUERY, AuthError
from ws_broadcaster.broadcaster import Broadcaster
from ws_broadcaster.connection import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_KEY_CONNECTION_LIMIT,
    CLOSE_POLICY_VIOLATION,
    Connection,
)
from ws_broadcaster.metrics import DropReason
from ws_broadcaster.protocol import Error, ProtocolError, parse_client_message
from ws_broadcaster.ratelimit import MessageLimiter
from ws_broadcaster.settings import WsSettings
from ws_broadcaster.state import BROADCASTER, METRICS, RESOLVER, SETTINGS

log = logging.getLogger(__name__)

WS_PATH: Final = "/v1/ws"
# How much the sender task writes between two looks at the transport's flow control (aiohttp's
# default is 256 KiB). The fan-out writes directly only below the transport's high-water mark
# (64 KiB) and queues above it, so a client that does not read holds about 128 KiB in the
# transport, then fills its queue and is dropped, instead of 320 KiB.
WRITER_LIMIT_BYTES: Final = 64 * 1024


def _http_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _limit_send_buffer(transport: asyncio.Transport | None, size: int) -> None:
    if not size or transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _new_response(settings: WsSettings) -> web.WebSocketResponse:
    return web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat_seconds,
        max_msg_size=settings.ws_max_message_bytes,
        # Per-message deflate would compress every update once per socket: the one encoding
        # shared by all subscribers is the point of the fan-out.
        compress=False,
        timeout=settings.ws_close_timeout_seconds,
        writer_limit=WRITER_LIMIT_BYTES,
    )


async def _close(ws: web.WebSocketResponse, code: int, reason: str, settings: WsSettings) -> None:
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(settings.ws_close_timeout_seconds):
            await ws.close(code=code, message=reason.encode())


async def websocket(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings, metrics = app[SETTINGS], app[METRICS]
    broadcaster, resolver = app[BROADCASTER], app[RESOLVER]

    if not settings.origin_allowed(request.headers.get(hdrs.ORIGIN)):
        metrics.connects.labels("origin_rejected").inc()
        return _http_error(403, "origin_not_allowed", "this origin may not open a WebSocket")
    ws = _new_response(settings)
    if not ws.can_prepare(request).ok:
        metrics.connects.labels("not_websocket").inc()
        response = _http_error(426, "upgrade_required", "GET /v1/ws is a WebSocket endpoint")
        response.headers[hdrs.UPGRADE] = "websocket"
        return response
    await ws.prepare(request)
    transport = request.transport
    _limit_send_buffer(transport, settings.ws_socket_send_buffer_bytes)

    raw_key = request.headers.get(API_KEY_HEADER) or request.query.get(API_KEY_QUERY)
    try:
        principal = await resolver.authenticate(raw_key)
    except AuthError as exc:
        metrics.connects.labels(exc.outcome).inc()
        await _close(ws, exc.close_code, exc.reason, settings)
        return ws

    conn_id = broadcaster.new_connection_id()
    if not await broadcaster.admit(principal, conn_id):
        metrics.connects.labels("key_connection_limit").inc()
        await _close(
            ws,
            CLOSE_KEY_CONNECTION_LIMIT,
            f"the {principal.tier} tier allows {principal.limits.max_connections} "
            "connections per key",
            settings,
        )
        return ws

    loop = asyncio.get_running_loop()
    limits = principal.limits
    conn = Connection(
        conn_id,
        ws,
        transport,
        principal,
        MessageLimiter(
            limits.messages_per_second, limits.burst, settings.ws_rate_limit_strikes, loop.time()
        ),
        metrics,
        queue_size=settings.ws_send_queue_size,
        close_timeout=settings.ws_close_timeout_seconds,
    )
    broadcaster.attach(conn)
    metrics.connects.labels("accepted").inc()
    try:
        await _receive_loop(conn, ws, broadcaster, loop)
    finally:
        if not ws.closed and not conn.closing:
            conn.close_soon(CLOSE_INTERNAL_ERROR, "internal error", None)
        await broadcaster.detach(conn)
    return ws


async def _receive_loop(
    conn: Connection,
    ws: web.WebSocketResponse,
    broadcaster: Broadcaster,
    loop: asyncio.AbstractEventLoop,
) -> None:
    async for msg in ws:
        if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
            if not conn.limiter.check(loop.time()):
                if conn.limiter.exhausted:
                    conn.close_soon(
                        CLOSE_POLICY_VIOLATION, "message rate exceeded", "rate_limit", flush=True
                    )
                    return
                broadcaster.error(
                    conn,
                    Error(
                        code="rate_limited",
                        message=f"at most {conn.principal.limits.messages_per_second:g} "
                        "messages per second; this one was ignored",
                    ),
                )
                continue
            if msg.type is WSMsgType.BINARY:
                broadcaster.error(
                    conn,
                    Error(code="binary_not_supported", message="send JSON text frames"),
                )
                continue
            try:
                message = parse_client_message(msg.data)
            except ProtocolError as exc:
                broadcaster.error(
                    conn, Error(id=exc.request_id, code=exc.code, message=exc.message)
                )
                continue
            await broadcaster.handle(conn, message)
        elif msg.type is WSMsgType.ERROR:
            reason = _error_reason(msg, ws)
            if reason is not None:
                conn.note_drop(reason)
            if reason == "heartbeat_timeout":
                conn.abort()  # the peer is gone: do not wait for its buffer to drain
            return


def _error_reason(msg: WSMessage, ws: web.WebSocketResponse) -> DropReason | None:
    exc = msg.data if isinstance(msg.data, BaseException) else ws.exception()
    if isinstance(exc, WebSocketError):
        return "message_too_big" if exc.code == WSCloseCode.MESSAGE_TOO_BIG else "protocol_error"
    if isinstance(exc, TimeoutError):
        return "heartbeat_timeout"
    return None
