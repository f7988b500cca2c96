"""Delivery latency of the WebSocket broadcaster, from produce to client receipt.

    .venv/bin/python bench/ws_fanout.py [--connections 1000 5000] [--rate 5] [--duration 20]

Against the local stack (Kafka, PostgreSQL, Redis on loopback), everything on this machine:

1. a fresh migrated database with one API key, a fresh ``token.metrics`` under a unique topic
   prefix, a Redis database of its own (``--redis-db``, flushed before and after) holding the
   tokens' snapshots as the writer would;
2. one broadcaster, ``tokvel run ws``, as its own process;
3. ``--connections`` WebSocket clients spread over ``--client-processes`` processes, each
   subscribed to all ``--tokens`` tokens, so every update goes to every connection. By default
   a minimal protocol-level client (so that the load generator, on the same CPUs, takes as
   little as possible from the broadcaster); ``--client aiohttp`` uses aiohttp's;
4. ``--rate`` samples per second for ``--duration`` seconds, round robin over the tokens, each
   stamped (``polled_at``) with the wall time just before the producer sends it;
5. each client notes the wall time at which each update frame arrives; the latency of one
   delivery is arrival - stamp. Percentiles are over all deliveries (updates x connections).

Also reported: deliveries missing (expected minus received), the broadcaster's drops, its own
histogram (produce → written to the socket) and its CPU time. Each run has its own broadcaster,
database and topic; everything is bounded in time and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import resource
import sys
import time
import uuid
from array import array
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, cast

import aiohttp
import asyncpg
import orjson
import uvloop
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from tokvel_common.apikeys import INSERT_KEY, display_prefix, generate_key, hash_key
from tokvel_common.cache import TokenMetadata, TokenSnapshot, encode_value, token_key
from tokvel_common.db.migrate import apply_migrations
from tokvel_common.events import MetricsSample, WindowCoverage
from tokvel_common.kafka import create_producer
from tokvel_common.serialization import encode, encode_key
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import METRICS, prefixed

PEPPER = "bench-ws-fanout-pepper"
STEP_TIMEOUT_SECONDS = 120.0
CONNECT_CONCURRENCY = 100
PARTITIONS = 6


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(wanted, soft)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if min(target, wanted) < wanted:
        raise SystemExit(f"need {wanted} file descriptors, the hard limit is {hard}")


def sample(cmc_id: int, n: int, stamp: datetime) -> MetricsSample:
    return MetricsSample(
        cmc_id=cmc_id,
        symbol=f"B{cmc_id}",
        name=f"Bench {cmc_id}",
        slug=f"bench-{cmc_id}",
        cmc_rank=cmc_id,
        ts=datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=n),
        price_usd=1.0 + n,
        market_cap_usd=1e9,
        volume_24h_usd=5e7,
        circulating_supply=1e9,
        total_supply=1e9,
        max_supply=None,
        percent_change_1h=0.1,
        percent_change_24h=0.2,
        percent_change_7d=0.3,
        velocity=0.05,
        velocity_1h=0.05,
        velocity_4h=0.05,
        velocity_12h=None,
        velocity_24h=0.05,
        velocity_7d=None,
        coverage={"1h": WindowCoverage(points_used=60, points_expected=60)},
        trend="stable",
        data_quality_score=0.95,
        quality_flags=[],
        polled_at=stamp,  # the produce stamp the clients measure from
    )


# ------------------------------------------------------------------------------ client side


def client_process(
    kind: str,
    url: str,
    key: str,
    tokens: list[int],
    connections: int,
    pipe: Connection,
) -> None:
    """Open ``connections`` WebSocket clients, report readiness, record arrivals until told."""
    raise_fd_limit(connections + 256)
    clients = _raw_clients if kind == "raw" else _clients
    latencies = uvloop.run(clients(url, key, tokens, connections, pipe))
    os.set_blocking(pipe.fileno(), True)  # the loop's reader made it non-blocking
    pipe.send_bytes(latencies.tobytes())
    pipe.close()


class RawClient(asyncio.Protocol):
    """A minimal RFC 6455 client on a bare asyncio protocol: handshake, one masked subscribe
    frame, then frame parsing with the arrival time taken when the bytes come in. A load
    generator as lean as it can be, so that the clients (on the same machine) take as little
    CPU from the broadcaster as possible; ``--client aiohttp`` uses aiohttp's client instead."""

    def __init__(self, host: str, key: str, tokens: list[int], latencies: array[float]) -> None:
        self._host = host
        self._key = key
        self._tokens = tokens
        self._latencies = latencies
        self._buffer = bytearray()
        self._open = False
        self._answers = 0
        self.transport: asyncio.Transport | None = None
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        nonce = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: {self._host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
                f"Sec-WebSocket-Version: 13\r\nX-API-Key: {self._key}\r\n\r\n"
            ).encode()
        )

    def _send(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None and len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def data_received(self, data: bytes) -> None:
        arrived = time.time()
        buffer = self._buffer
        buffer += data
        if not self._open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.subscribed.set_exception(RuntimeError(bytes(buffer[:end]).decode()))
                return
            del buffer[: end + 4]
            self._open = True
            subscribe = orjson.dumps({"op": "subscribe", "token_ids": self._tokens})
            self._send(0x1, subscribe)
        position = 0
        size = len(buffer)
        while size - position >= 2:
            opcode = buffer[position] & 0x0F
            length = buffer[position + 1] & 0x7F
            start = position + 2
            if length == 126:
                if size - position < 4:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 4], "big")
                start = position + 4
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 10], "big")
                start = position + 10
            end = start + length
            if end > size:
                break
            self._frame(opcode, bytes(buffer[start:end]), arrived)
            position = end
        del buffer[:position]

    def _frame(self, opcode: int, payload: bytes, arrived: float) -> None:
        if opcode == 0x1:
            if payload.startswith(b'{"op":"update"'):
                at = payload.index(b'"polled_at":"') + 13
                stamp = datetime.fromisoformat(payload[at : payload.index(b'"', at)].decode())
                self._latencies.append(arrived - stamp.timestamp())
            elif not self.subscribed.done():
                self._answers += 1
                if not payload.startswith((b'{"op":"subscribed"', b'{"op":"snapshot"')):
                    self.subscribed.set_exception(RuntimeError(payload.decode()))
                elif self._answers == 1 + len(self._tokens):
                    self.subscribed.set_result(None)
        elif opcode == 0x9:  # ping: the broadcaster's heartbeat
            self._send(0xA, payload)
        elif opcode == 0x8 and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(exc or ConnectionError("closed while subscribing"))


async def _raw_clients(
    url: str, key: str, tokens: list[int], connections: int, pipe: Connection
) -> array[float]:
    latencies: array[float] = array("d")
    loop = asyncio.get_running_loop()
    host, port = url.split("/")[2].split(":")
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    clients: list[RawClient] = []

    async def connect() -> None:
        async with limit:
            _, client = await loop.create_connection(
                lambda: RawClient(f"{host}:{port}", key, tokens, latencies), host, int(port)
            )
            clients.append(client)
            await client.subscribed

    await asyncio.gather(*(connect() for _ in range(connections)))
    stop = asyncio.Event()
    loop.add_reader(pipe.fileno(), stop.set)
    pipe.send_bytes(b"ready")
    await stop.wait()
    loop.remove_reader(pipe.fileno())
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    return latencies


async def _clients(
    url: str, key: str, tokens: list[int], connections: int, pipe: Connection
) -> array[float]:
    latencies: array[float] = array("d")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(pipe.fileno(), stop.set)
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def connect() -> aiohttp.ClientWebSocketResponse[Literal[False]]:
            async with limit:
                ws = await session.ws_connect(url, headers={"X-API-Key": key}, decode_text=False)
                await ws.send_str(orjson.dumps({"op": "subscribe", "token_ids": tokens}).decode())
                for _ in range(1 + len(tokens)):  # subscribed + one snapshot per token
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"connection closed while subscribing: {msg}")
                    if orjson.loads(msg.data)["op"] not in ("subscribed", "snapshot"):
                        raise RuntimeError(f"unexpected answer to subscribe: {msg.data!r}")
                return ws

        sockets = await asyncio.gather(*(connect() for _ in range(connections)))

        async def read(ws: aiohttp.ClientWebSocketResponse[Literal[False]]) -> None:
            # Cheap on purpose: the clients share the machine with the broadcaster, and every
            # microsecond they spend is one it does not get. The stamp is found without a full
            # JSON parse (text frames are kept as bytes).
            now = time.time
            parse = datetime.fromisoformat
            marker = b'"polled_at":"'
            record = latencies.append
            while True:
                msg = await ws.receive()
                arrived = now()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    return
                data: bytes = msg.data
                if data.startswith(b'{"op":"update"'):
                    at = data.index(marker) + len(marker)
                    record(arrived - parse(data[at : data.index(b'"', at)].decode()).timestamp())

        readers = [asyncio.create_task(read(ws)) for ws in sockets]
        pipe.send_bytes(b"ready")
        await stop.wait()
        loop.remove_reader(pipe.fileno())
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return latencies


# ---------------------------------------------------------------------------- server side


async def prepare_database(base: CommonSettings, name: str) -> tuple[str, str]:
    admin_dsn = base.database_url.get_secret_value()
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn)
        key = generate_key()
        from pydantic import SecretStr

        await conn.execute(
            INSERT_KEY, hash_key(key, SecretStr(PEPPER)), display_prefix(key), "bench", "bench"
        )
    finally:
        await conn.close()
    return dsn, key


async def drop_database(base: CommonSettings, name: str) -> None:
    conn = await asyncpg.connect(base.database_url.get_secret_value())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def redis_url(base: CommonSettings, db: int) -> str:
    return base.redis_url.get_secret_value().rsplit("/", 1)[0] + f"/{db}"


async def scrape(http: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(http + "/metrics") as response:
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def bucket_bound(buckets: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the histogram bucket holding the q-quantile (cumulative buckets)."""
    if not buckets or not buckets[-1][1]:
        return float("nan")
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return buckets[-1][0]


async def run_once(
    args: argparse.Namespace, base: CommonSettings, connections: int
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-ws-{run_id}."
    topic = prefixed(prefix, METRICS)
    database = f"tokvel_bench_ws_{run_id}"
    tokens = list(range(1, args.tokens + 1))
    port = args.port
    rurl = redis_url(base, args.redis_db)
    redis = Redis.from_url(rurl)
    admin = AIOKafkaAdminClient(bootstrap_servers=base.kafka_bootstrap_servers)
    await admin.start()
    server: asyncio.subprocess.Process | None = None
    ctx = mp.get_context("spawn")
    processes: list[Any] = []
    pipes: list[Connection] = []
    try:
        await redis.flushdb()
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        dsn, key = await prepare_database(base, database)
        for cmc_id in tokens:  # what the writer would have cached
            snapshot = TokenSnapshot(
                token=TokenMetadata(cmc_id=cmc_id, symbol=f"B{cmc_id}"),
                metrics=sample(cmc_id, 0, datetime.now(UTC)),
            )
            await redis.set(token_key(cmc_id), encode_value(snapshot), ex=3600)

        tiers = {
            "bench": {
                "max_subscriptions": 1000,
                "max_connections": connections + 10,
                "messages_per_second": 100,
                "burst": 100,
            },
            "basic": {
                "max_subscriptions": 50,
                "max_connections": 5,
                "messages_per_second": 5,
                "burst": 20,
            },
        }
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "REDIS_URL": rurl,
            "TOPIC_PREFIX": prefix,
            "API_KEY_PEPPER": PEPPER,
            "WS_TIERS": orjson.dumps(tiers).decode(),
            "WS_HOST": "127.0.0.1",
            "WS_PORT": str(port),
            "LOG_LEVEL": "WARNING",
            "WS_EVENT_LOOP": args.event_loop,
        }
        tokvel = Path(sys.executable).with_name("tokvel")
        server = await asyncio.create_subprocess_exec(
            str(tokvel), "run", "ws", env=env, stdout=asyncio.subprocess.DEVNULL
        )
        http = f"http://127.0.0.1:{port}"
        async with asyncio.timeout(STEP_TIMEOUT_SECONDS), aiohttp.ClientSession() as session:
            while True:
                with suppress(aiohttp.ClientError):
                    async with session.get(http + "/readyz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.2)

        per_process = [
            connections // args.client_processes + (i < connections % args.client_processes)
            for i in range(args.client_processes)
        ]
        started = time.monotonic()
        for count in per_process:
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=client_process,
                args=(args.client, f"ws://127.0.0.1:{port}/v1/ws", key, tokens, count, child),
                daemon=True,
            )
            process.start()
            child.close()
            processes.append(process)
            pipes.append(parent)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(STEP_TIMEOUT_SECONDS):
            for pipe in pipes:
                assert await loop.run_in_executor(None, pipe.recv_bytes) == b"ready"
        say(f"  {connections} connections subscribed in {time.monotonic() - started:.1f} s")
        await asyncio.sleep(1.0)

        cpu_before = cpu_seconds(server.pid)
        producer = create_producer(base.kafka_bootstrap_servers, client_id="bench", linger_ms=0)
        await producer.start()
        produced = 0
        try:
            interval = 1.0 / args.rate
            begin = time.monotonic()
            total = int(args.rate * args.duration)
            for n in range(total):
                delay = begin + n * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                cmc_id = tokens[n % len(tokens)]
                value = encode(sample(cmc_id, n + 1, datetime.now(UTC)))
                await producer.send(topic, value, key=encode_key(cmc_id))
                produced += 1
            await producer.flush()
        finally:
            await producer.stop()
        expected = produced * connections
        await asyncio.sleep(args.drain)
        cpu = cpu_seconds(server.pid) - cpu_before

        latencies: list[float] = []
        for pipe in pipes:
            pipe.send_bytes(b"stop")
        async with asyncio.timeout(STEP_TIMEOUT_SECONDS):
            for pipe in pipes:
                data = await loop.run_in_executor(None, pipe.recv_bytes)
                chunk: array[float] = array("d")
                chunk.frombytes(data)
                latencies.extend(chunk)
        metrics = await scrape(http)
        latencies.sort()
        drops = {
            dict(labels)["reason"]: value
            for (name, labels), value in metrics.items()
            if name == "ws_drops_total"
        }
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (name, labels), value in metrics.items()
            if name == "ws_delivery_latency_seconds_bucket"
        )
        server_count = metrics.get(("ws_delivery_latency_seconds_count", ()), 0.0)
        server_sum = metrics.get(("ws_delivery_latency_seconds_sum", ()), 0.0)
        return {
            "connections": connections,
            "client_processes": args.client_processes,
            "event_loop": args.event_loop,
            "client": args.client,
            "rate_per_second": args.rate,
            "duration_seconds": args.duration,
            "updates": produced,
            "deliveries_expected": expected,
            "deliveries_received": len(latencies),
            "p50_ms": percentile(latencies, 0.50) * 1000,
            "p90_ms": percentile(latencies, 0.90) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
            "server_mean_to_socket_ms": server_sum / server_count * 1000 if server_count else None,
            "server_p50_to_socket_le_ms": bucket_bound(buckets, 0.50) * 1000,
            "server_p99_to_socket_le_ms": bucket_bound(buckets, 0.99) * 1000,
            "server_cpu_percent": cpu / (args.duration + args.drain) * 100,
            "drops": drops,
        }
    finally:
        for pipe in pipes:
            with suppress(OSError):
                pipe.close()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        if server is not None and server.returncode is None:
            server.terminate()
            try:
                await asyncio.wait_for(server.wait(), 30)
            except TimeoutError:
                server.kill()
                await server.wait()
        with suppress(Exception):
            await admin.delete_topics([topic])
        await admin.close()
        await drop_database(base, database)
        await redis.flushdb()
        await redis.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--rate", type=float, default=5.0, help="samples per second, in all")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of producing")
    parser.add_argument("--drain", type=float, default=5.0, help="seconds to wait after it")
    parser.add_argument("--port", type=int, default=18081)
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--client",
        choices=["raw", "aiohttp"],
        default="raw",
        help="load generator: a minimal protocol-level client, or aiohttp's (heavier)",
    )
    args = parser.parse_args()
    raise_fd_limit(max(args.connections) * 2 + 1024)
    base = CommonSettings()
    results = []
    for connections in args.connections:
        say(f"run: {connections} connections, {args.rate:g} updates/s for {args.duration:g} s")
        result = await run_once(args, base, connections)
        results.append(result)
        say(
            f"  p50 {result['p50_ms']:.1f} ms  p90 {result['p90_ms']:.1f} ms  "
            f"p99 {result['p99_ms']:.1f} ms  max {result['max_ms']:.1f} ms  "
            f"received {result['deliveries_received']}/{result['deliveries_expected']}  "
            f"drops {result['drops'] or 0}  server CPU {result['server_cpu_percent']:.0f}%"
        )
        say(
            f"  broadcaster alone (record timestamp -> socket write, histogram bucket bounds): "
            f"p50 <= {result['server_p50_to_socket_le_ms']:g} ms, "
            f"p99 <= {result['server_p99_to_socket_le_ms']:g} ms"
        )
    for result in results:
        say(orjson.dumps(result).decode())


if __name__ == "__main__":
    asyncio.run(main())
