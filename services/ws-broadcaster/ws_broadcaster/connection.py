"""One client connection: its bounded send queue, the task that drains it, and its closing.

Nothing that produces messages ever awaits a client. The fan-out (and every reply) calls
:meth:`Connection.offer`. When nothing is queued and the transport's buffer is below its
high-water mark (the common case: a client that reads), the frame, built once per message for
every socket, is written to the transport there and then: no task to wake per socket per update
(with 5 000 sockets that wake-up cost as much as the writes). Otherwise it is appended to a
bounded deque and the connection's sender task is woken; only that task awaits the socket, and
as long as anything is queued every later message queues behind it, so the order holds. A
client that stops reading fills its kernel buffer (bounded by ``WS_SOCKET_SEND_BUFFER_BYTES``),
then the transport's, then the queue: the next ``offer`` fails and the connection is closed
with 4008, while every other client goes on.

Closing runs in a task of its own (:meth:`close_soon`), bounded by ``WS_CLOSE_TIMEOUT_SECONDS``:
a client that does not read cannot take part in a closing handshake, so after the timeout the
socket is aborted (RST) rather than left to drain forever. The handler that owns the connection
awaits both tasks (:meth:`finish`) before it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Final

from aiohttp import WSMsgType, web

from ws_broadcaster.auth import Principal
from ws_broadcaster.hub import MessageKind, Outgoing
from ws_broadcaster.metrics import DropReason, WsMetrics
from ws_broadcaster.protocol import ServerMessage, encode_message
from ws_broadcaster.ratelimit import MessageLimiter

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SLOW_CONSUMER: Final = 4008
CLOSE_KEY_CONNECTION_LIMIT: Final = 4029


class Connection:
    __slots__ = (
        "_close_timeout",
        "_closer",
        "_high_water",
        "_idle",
        "_metrics",
        "_queue",
        "_queue_size",
        "_sender",
        "_sent_by_kind",
        "_transport",
        "_wakeup",
        "_ws",
        "closing",
        "drop_reason",
        "id",
        "limiter",
        "principal",
    )

    def __init__(
        self,
        connection_id: str,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        principal: Principal,
        limiter: MessageLimiter,
        metrics: WsMetrics,
        *,
        queue_size: int,
        close_timeout: float,
    ) -> None:
        self.id = connection_id
        self.principal = principal
        self.limiter = limiter
        self.closing = False
        self.drop_reason: DropReason | None = None
        self._ws = ws
        self._transport = transport
        self._high_water = transport.get_write_buffer_limits()[1] if transport is not None else 0
        self._metrics = metrics
        self._sent_by_kind = {
            kind: metrics.messages_sent.labels(kind)
            for kind in ("update", "replay", "snapshot", "reply")
        }
        self._queue: deque[Outgoing] = deque()
        self._queue_size = queue_size
        self._close_timeout = close_timeout
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set while the sender has nothing to send
        self._sender: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Connection({self.id})"

    # ------------------------------------------------------------------------ sending

    def start(self) -> None:
        self._sender = asyncio.create_task(self._send_loop(), name=f"ws-send-{self.id}")

    def offer(self, item: Outgoing) -> bool:
        """Queue without waiting; False when the queue is full (the caller drops the client).

        A closing connection accepts and discards: it was reported once already.
        """
        if self.closing:
            return True
        transport = self._transport
        if (
            not self._queue
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() < self._high_water
            and not self._ws.closed
        ):
            transport.write(item.wire)
            self._count_sent(item)
            return True
        if len(self._queue) >= self._queue_size:
            return False
        self._queue.append(item)
        self._idle.clear()
        self._wakeup.set()
        return True

    def reply(self, message: ServerMessage) -> None:
        """Queue one message of this connection's own (answers, snapshots)."""
        kind: MessageKind = "snapshot" if message.op == "snapshot" else "reply"
        if not self.offer(Outgoing(encode_message(message), kind)):
            self.close_soon(CLOSE_SLOW_CONSUMER, "send queue full", "slow_consumer")

    def send_all(self, items: list[Outgoing]) -> None:
        for item in items:
            if not self.offer(item):
                self.close_soon(CLOSE_SLOW_CONSUMER, "send queue full", "slow_consumer")
                return

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _count_sent(self, item: Outgoing) -> None:
        if item.produced_at is not None:
            self._metrics.delivery_latency.observe(time.time() - item.produced_at)
        self._sent_by_kind[item.kind].inc()

    async def _send_loop(self) -> None:
        ws, queue, wakeup, idle = self._ws, self._queue, self._wakeup, self._idle
        try:
            while True:
                if not queue:
                    idle.set()
                    wakeup.clear()
                    await wakeup.wait()
                    continue
                while queue:
                    item = queue.popleft()
                    # The frame was encoded once for every subscriber; this writes the same
                    # bytes as a text frame (no per-socket encoding, no compression).
                    await ws.send_frame(item.frame, WSMsgType.TEXT)
                    self._count_sent(item)
        except ConnectionError:
            # The peer went away (aiohttp raises ClientConnectionResetError, a
            # ConnectionResetError): the handler's receive loop sees it too and cleans up.
            pass

    # ------------------------------------------------------------------------ closing

    def close_soon(
        self, code: int, message: str, reason: DropReason | None, *, flush: bool = False
    ) -> None:
        """Stop accepting messages and close with ``code`` in the background (idempotent).

        With ``flush`` what is already queued (answers, the last updates) is sent first, within
        the close timeout; without it (the client does not read, or a bug) it is discarded.
        """
        if self.closing:
            return
        self.closing = True
        self.drop_reason = reason
        if reason is not None:
            self._metrics.drops.labels(reason).inc()
        if not flush:
            self._queue.clear()
            if self._sender is not None:
                self._sender.cancel()
        self._closer = asyncio.create_task(self._close(code, message), name=f"ws-close-{self.id}")

    def note_drop(self, reason: DropReason) -> None:
        """aiohttp closed the connection itself (dead peer, oversized or malformed frame)."""
        if self.closing:
            return
        self.closing = True
        self.drop_reason = reason
        self._metrics.drops.labels(reason).inc()
        self._queue.clear()
        if self._sender is not None:
            self._sender.cancel()

    async def _close(self, code: int, message: str) -> None:
        try:
            async with asyncio.timeout(self._close_timeout):
                if self._queue and self._sender is not None and not self._sender.done():
                    await self._idle.wait()
                if self._sender is not None:
                    self._sender.cancel()
                await self._ws.close(code=code, message=message.encode())
        except (TimeoutError, ConnectionError):
            pass
        finally:
            # However the handshake went, the socket goes now: aiohttp's own close of the
            # transport waits for its buffer to drain, which a client that does not read never
            # lets happen (the socket would live until TCP gives up, minutes later).
            self.abort()
            if self._sender is not None:
                self._sender.cancel()  # it may still be waiting to flush to that client

    def abort(self) -> None:
        """Drop the TCP connection now, discarding what is buffered for it."""
        if self._transport is not None:
            self._transport.abort()  # a no-op on a transport that is already closed

    async def finish(self) -> None:
        """Await the connection's tasks (the owner calls this once, when its handler ends):
        the closer first (it may still be flushing through the sender), then the sender."""
        for task in (self._closer, self._sender):
            if task is None:
                continue
            if task is self._sender:
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if task.cancelled():
                    continue
                raise  # the handler itself is being cancelled
            except Exception:
                log.exception("connection task failed", extra={"connection": self.id})
