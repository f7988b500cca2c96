"""Clients that misbehave on purpose, at the byte level: raw HTTP requests and a minimal
RFC 6455 WebSocket client that can announce any frame size, write without reading, or never
read at all. (aiohttp's clients are well behaved: they would refuse most of this.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final
from urllib.parse import urlsplit

from tests.abuse.stack import Service

MiB: Final = 1024 * 1024
CHUNK: Final = 64 * 1024
RESPONSE_SECONDS: Final = 30.0
OP_TEXT: Final = 0x1
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
# A zero masking key leaves the payload as it is (RFC 6455 allows any key): a 10 MiB frame
# costs no masking work in the attacker.
ZERO_MASK: Final = b"\0\0\0\0"

PEER_GONE: Final = (ConnectionError, OSError)


def format_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def peak_growth(service: Service) -> int:
    """Bytes the service's peak resident memory grew since its :meth:`Service.reset_peak`."""
    _, peak = service.memory()
    return max(0, peak - service.peak_baseline)


async def _write_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data`` in chunks; the peer may close at any point (that is often the test)."""
    with contextlib.suppress(*PEER_GONE):
        for start in range(0, len(data), CHUNK):
            writer.write(data[start : start + CHUNK])
            await writer.drain()


async def raw_http_status(base_url: str, request: bytes) -> int | None:
    """Send ``request`` as is while reading the answer: its status code, or None when the
    connection was reset before one arrived (a server that stops reading a request it refuses
    closes with data unread, and TCP then drops what the client had not read yet)."""
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    sending = asyncio.create_task(_write_all(writer, request))
    try:
        async with asyncio.timeout(RESPONSE_SECONDS):
            status_line = await reader.readline()
        return int(status_line.split()[1]) if status_line else None
    except PEER_GONE:
        return None
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.transport.abort()


def http_request(target: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def frame_header(opcode: int, length: int) -> bytes:
    """A masked client frame header announcing ``length`` payload bytes."""
    if length < 126:
        return bytes((0x80 | opcode, 0x80 | length)) + ZERO_MASK
    if length < 1 << 16:
        return bytes((0x80 | opcode, 0x80 | 126)) + struct.pack(">H", length) + ZERO_MASK
    return bytes((0x80 | opcode, 0x80 | 127)) + struct.pack(">Q", length) + ZERO_MASK


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send_text(self, payload: bytes, *, tolerate_reset: bool = False) -> None:
        data = frame_header(OP_TEXT, len(payload)) + payload
        if tolerate_reset:
            await _write_all(self.writer, data)
            return
        self.writer.write(data)
        await self.writer.drain()

    async def send_prefix(self, payload: bytes, size: int) -> None:
        """The frame header for all of ``payload``, then only its first ``size`` bytes."""
        self.writer.write(frame_header(OP_TEXT, len(payload)) + payload[:size])
        await self.writer.drain()

    def abort(self) -> None:
        """Drop the connection at once (an attacker does not say goodbye)."""
        self.writer.transport.abort()

    def send_nowait(self, payload: bytes) -> None:
        """Queue a frame without waiting for the socket (a flood)."""
        self.writer.write(frame_header(OP_TEXT, len(payload)) + payload)

    async def receive_frame(self) -> tuple[int, bytes]:
        """The next frame (server frames are not masked, not fragmented here)."""
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(length)

    async def receive_text(self, within: float = RESPONSE_SECONDS) -> bytes:
        async with asyncio.timeout(within):
            while True:
                opcode, payload = await self.receive_frame()
                if opcode == OP_TEXT:
                    return payload
                if opcode == OP_CLOSE:
                    raise AssertionError(f"closed: {self.close_code(payload)}")

    async def receive_close_code(self, within: float = RESPONSE_SECONDS) -> int | None:
        """Read (and drop) frames up to the close frame: its code; None if the connection
        ended without one (reset)."""
        try:
            async with asyncio.timeout(within):
                while True:
                    opcode, payload = await self.receive_frame()
                    if opcode == OP_CLOSE:
                        return self.close_code(payload)
        except (asyncio.IncompleteReadError, *PEER_GONE):
            return None

    @staticmethod
    def close_code(payload: bytes) -> int | None:
        return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None


async def open_websocket(
    url: str,
    key: str | None,
    *,
    origin: str | None = None,
    receive_buffer: int | None = None,
) -> tuple[int, RawWebSocket]:
    """The handshake: (HTTP status, the socket). The caller closes ``ws.writer``."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        # Before connecting, so the TCP window is small from the start (a client that reads
        # nothing then holds almost nothing: the server's side fills up instead).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    if key is not None:
        headers["X-API-Key"] = key
    if origin is not None:
        headers["Origin"] = origin
    target = f"{parts.path}?{parts.query}" if parts.query else parts.path
    writer.write(http_request(target, headers))
    await writer.drain()
    async with asyncio.timeout(RESPONSE_SECONDS):
        head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), RawWebSocket(reader, writer)


@asynccontextmanager
async def raw_websocket(url: str, key: str) -> AsyncIterator[RawWebSocket]:
    status, ws = await open_websocket(url, key)
    try:
        assert status == 101, status
        yield ws
    finally:
        ws.abort()
