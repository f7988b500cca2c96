"""A loopback TCP proxy that a test can cut, blackhole and restore: outages of the service behind.

``cut`` is a crashed server (connections reset, new ones refused: clients fail at once);
``blackhole`` is a network that drops every packet (connections stay open and new ones are
accepted, but no byte gets through either way: clients learn of it only by their timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._blackholed = False
        # Connections that lost bytes to the blackhole: their streams are broken for good.
        self._silenced: set[asyncio.StreamWriter] = set()
        self.port = port  # 0: any free port, chosen by the first start

    async def start(self) -> None:
        """Accept again (on the same port after a cut)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and kill the open ones, as a crashed server would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def blackhole(self) -> None:
        """From now on every byte, either way, is dropped; connections are still accepted."""
        self._blackholed = True

    def heal(self) -> None:
        """Forward again; connections that lost bytes meanwhile are reset (they are broken)."""
        self._blackholed = False
        for writer in list(self._silenced):
            writer.transport.abort()
        self._silenced.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blackholed:
            # Accepted (the kernel does that much) but never connected through.
            self._writers.add(writer)
            self._silenced.add(writer)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while await reader.read(65536):
                    pass
            self._writers.discard(writer)
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._writers |= set(pair)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, pair)),
            asyncio.create_task(self._pump(up_reader, writer, pair)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            for w in pair:
                self._writers.discard(w)
                self._silenced.discard(w)
                w.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self._blackholed:
                    self._silenced.update(pair)
                    continue
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
