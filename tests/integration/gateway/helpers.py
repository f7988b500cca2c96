"""Small helpers shared by the gateway's integration tests."""

from __future__ import annotations

import asyncio
import socket
import time

from tokvel_common.apikeys import RATE_LIMIT_WINDOW_SECONDS


async def minute_with_room(seconds: float = 20.0) -> None:
    """Wait, if needed, so that at least ``seconds`` remain in the current minute window.

    Per-minute limits reset at the minute: a test counting requests must not straddle it.
    """
    left = RATE_LIMIT_WINDOW_SECONDS - time.time() % RATE_LIMIT_WINDOW_SECONDS
    if left < seconds:
        await asyncio.sleep(left + 0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
