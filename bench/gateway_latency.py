"""Cached ``GET /v1/tokens/{id}`` through the whole gateway vs a bare aiohttp handler doing one
redis-py GET: requests per second and p99 latency, same machine, same run.

    .venv/bin/python bench/gateway_latency.py [--seconds 10] [--connections 64] [--rounds 3]
        [--json PATH]

Sets up its own isolation on loopback and tears it down: a scratch database (migrated, one real
token from the recorded data), a private redis-server on a free port, the gateway as
``tokvel run gateway`` (access log off, an API key on a tier with limits too high to bind, so
authentication, the Redis rate-limit script and the quota bookkeeping all run) and the bare
server, each a single process. The load comes from ``wrk`` (Debian package ``wrk``) in another
process, or, without it, from an aiohttp load generator in a separate process. The two servers
are measured in alternating rounds (gateway, bare, gateway, bare...), so a change in the load of
a shared machine hits both alike; each figure is the median of its rounds. Bounded: about
``2 x rounds x (seconds + 2)`` seconds plus start-up. Loopback only.

Figures (``--json``, see ``bench/report.py``): the gateway's req/s, target at least 70 % of the
bare server's, and its p99 latency, target at most the bare server's p99.

The machine has 2 cores: the server under test and the load generator share them, so absolute
numbers are lower than on a dedicated host; the ratio between the two servers is the point.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Figure, write_figures
from tokvel_common.apikeys import INSERT_KEY, display_prefix, generate_key, hash_key
from tokvel_common.db.migrate import apply_migrations
from tokvel_common.paths import DEFAULT_REPLAY_DATA
from tokvel_common.redis_client import RedisClient, create_redis
from tokvel_common.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[1]
TOKVEL = Path(sys.executable).with_name("tokvel")
PEPPER = "bench-pepper"
TIERS = {"bench": {"per_minute": 1_000_000_000, "per_month": 1_000_000_000_000}}
CMC_ID = 1
WINDOWS = ("1h", "4h", "12h", "7d")
RPS_TARGET_RATIO = 0.70


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ------------------------------------------------------------------------------- bare server

CLIENT = web.AppKey[RedisClient]("client")


def bare_main(port: int, redis_url: str) -> None:
    """One aiohttp handler, one redis-py GET: the floor any Redis-backed endpoint stands on."""

    async def redis_ctx(app: web.Application) -> Any:
        app[CLIENT] = create_redis(redis_url, socket_timeout=0.25)
        yield
        await app[CLIENT].aclose()

    async def handler(request: web.Request) -> web.Response:
        value = await request.app[CLIENT].get(f"token:{request.match_info['cmc_id']}")
        if value is None:
            raise web.HTTPNotFound()
        return web.Response(body=value, content_type="application/json")

    app = web.Application()
    app.cleanup_ctx.append(redis_ctx)
    app.router.add_get("/v1/tokens/{cmc_id}", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ------------------------------------------------------------------------------------ set-up


async def create_database(admin_dsn: str) -> tuple[str, str]:
    name = f"tokvel_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))
    return name, dsn


async def load_token(dsn: str) -> str:
    """Migrations, Bitcoin's first recorded sample, and a key; returns the key."""
    with gzip.open(DEFAULT_REPLAY_DATA, "rt", encoding="utf-8") as handle:
        row = json.loads(handle.readline())
    ts = datetime.fromisoformat(row["ts"].replace("Z", "+00:00"))
    velocity = round(row["volume_24h_usd"] / row["market_cap_usd"], 8)
    sample = {
        "cmc_id": row["cmc_id"], "symbol": row["symbol"], "name": row["name"],
        "slug": row["slug"], "cmc_rank": row["cmc_rank"], "ts": ts.isoformat(),
        "price_usd": row["price_usd"], "market_cap_usd": row["market_cap_usd"],
        "volume_24h_usd": row["volume_24h_usd"],
        "circulating_supply": row["circulating_supply"], "total_supply": None,
        "max_supply": None, "percent_change_1h": row["percent_change_1h"],
        "percent_change_24h": row["percent_change_24h"],
        "percent_change_7d": row["percent_change_7d"], "velocity": velocity,
        "velocity_1h": velocity, "velocity_4h": velocity, "velocity_12h": velocity,
        "velocity_24h": velocity, "velocity_7d": velocity,
        "coverage": {w: {"points_used": 1, "points_expected": 1} for w in WINDOWS},
        "trend": "insufficient_data", "trend_recent_avg": None, "data_quality_score": 0.9,
        "quality_flags": [], "polled_at": ts.isoformat(), "schema_version": 1,
    }  # fmt: skip
    key = generate_key()
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn)
        token_id = await conn.fetchval(
            "INSERT INTO tokens (cmc_id, symbol, name, slug, cmc_rank) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING id",
            row["cmc_id"], row["symbol"], row["name"], row["slug"], row["cmc_rank"],
        )  # fmt: skip
        await conn.execute(
            'INSERT INTO token_latest (token_id, "timestamp", cmc_rank, market_cap_usd, sample) '
            "VALUES ($1, $2, $3, $4, $5)",
            token_id, ts, row["cmc_rank"], row["market_cap_usd"], orjson.dumps(sample).decode(),
        )  # fmt: skip
        await conn.execute(
            INSERT_KEY, hash_key(key, SecretStr(PEPPER)), display_prefix(key), "bench", "bench"
        )
    finally:
        await conn.close()
    return key


async def wait_http(url: str, headers: dict[str, str], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    last = "no answer"
    async with ClientSession(timeout=ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url, headers=headers) as response:
                    if response.status == 200:
                        return
                    last = f"{response.status} {await response.text()}"
            except (OSError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 in {seconds:g} s (last: {last})")


# ---------------------------------------------------------------------------------- load


@dataclass
class Result:
    name: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str


def _ms(text: str) -> float:
    number = float(re.sub(r"[a-z]+$", "", text))
    unit = re.sub(r"^[0-9.]+", "", text)
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(name: str, url: str, key: str | None, seconds: int, connections: int) -> Result:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if key:
        command[1:1] = ["-H", f"X-API-Key: {key}"]
    out = subprocess.run(  # noqa: S603 - fixed argv, loopback target
        command, capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    # The "Latency Distribution" lines only ("70.50%" elsewhere also ends in "50%").
    p50 = re.search(r"^\s+50%\s+(\S+)\s*$", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)\s*$", out, re.M)
    if rps is None or p50 is None or p99 is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses:|timeout) (\d+)", out))
    return Result(name, float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), errors, "wrk")


async def _python_load(url: str, key: str | None, seconds: int, connections: int) -> dict[str, Any]:
    headers = {"X-API-Key": key} if key else {}
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    connector = TCPConnector(limit=connections)
    async with ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
    }


def run_python(name: str, url: str, key: str | None, seconds: int, connections: int) -> Result:
    """The fallback generator, in a process of its own (never in the server's)."""
    command = [
        sys.executable, __file__, "--load", url, "--seconds", str(seconds),
        "--connections", str(connections),
    ]  # fmt: skip
    env = {**os.environ, "BENCH_KEY": key or ""}
    out = subprocess.run(  # noqa: S603 - our own script
        command, capture_output=True, text=True, check=True, timeout=seconds + 60, env=env
    ).stdout
    data = json.loads(out)
    return Result(name, data["rps"], data["p50"], data["p99"], data["errors"], "aiohttp")


# ---------------------------------------------------------------------------------- main


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _setup(admin_dsn: str) -> tuple[str, str, str]:
    db_name, dsn = await create_database(admin_dsn)
    return db_name, dsn, await load_token(dsn)


async def _drop(admin_dsn: str, db_name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    finally:
        await conn.close()


def bench(seconds: int, connections: int, rounds: int) -> list[Result]:
    """Every measured round of both servers, in the order they ran."""
    admin_dsn = CommonSettings().database_url.get_secret_value()
    db_name, dsn, key = asyncio.run(_setup(admin_dsn))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        redis_port, gateway_port, bare_port = free_port(), free_port(), free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
        redis_argv = [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1"]
        redis_argv += ["--save", "", "--appendonly", "no"]
        processes.append(subprocess.Popen(redis_argv, stdout=subprocess.DEVNULL))  # noqa: S603
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(gateway_port),
            "DATABASE_URL": dsn,
            "REDIS_URL": redis_url,
            "API_KEY_PEPPER": PEPPER,
            "API_TIERS": json.dumps(TIERS),
            "API_DEFAULT_TIER": "bench",
            "ACCESS_LOG": "false",
            "LOG_LEVEL": "WARNING",
        }
        processes.append(subprocess.Popen([str(TOKVEL), "run", "gateway"], env=env))  # noqa: S603
        bare_argv = [sys.executable, __file__, "--bare", str(bare_port), "--redis", redis_url]
        processes.append(subprocess.Popen(bare_argv))  # noqa: S603 - our own script
        gateway_url = f"http://127.0.0.1:{gateway_port}/v1/tokens/{CMC_ID}"
        bare_url = f"http://127.0.0.1:{bare_port}/v1/tokens/{CMC_ID}"
        asyncio.run(wait_http(gateway_url, {"X-API-Key": key}))  # the miss fills token:1
        asyncio.run(wait_http(bare_url, {}))
        runner = run_wrk if shutil.which("wrk") else run_python
        targets = (("gateway", gateway_url, key), ("bare", bare_url, None))
        for name, url, header in targets:
            runner(name, url, header, 2, connections)  # warm-up, not counted
        results = []
        for _ in range(rounds):
            for name, url, header in targets:
                results.append(runner(name, url, header, seconds, connections))
        return results
    finally:
        for process in reversed(processes):
            _stop(process)
        asyncio.run(_drop(admin_dsn, db_name))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def figures(results: Sequence[Result], connections: int, seconds: int) -> list[Figure]:
    gateway = [r for r in results if r.name == "gateway"]
    bare = [r for r in results if r.name == "bare"]
    errors = sum(r.errors for r in gateway)  # the gateway must answer every request
    rps, bare_rps = (_median([r.requests_per_second for r in rs]) for rs in (gateway, bare))
    p99, bare_p99 = (_median([r.p99_ms for r in rs]) for rs in (gateway, bare))
    detail: dict[str, Any] = {
        "connections": connections,
        "seconds_per_round": seconds,
        "load_generator": results[0].tool,
        "non_2xx": {"gateway": errors, "bare": sum(r.errors for r in bare)},
        "rounds": [asdict(r) for r in results],
    }
    baseline_name = "bare aiohttp handler doing one redis-py GET, same run"
    return [
        Figure(
            figure=f"cached GET /v1/tokens/{{id}}, {connections} connections: throughput",
            unit="req/s",
            tokvel=rps,
            target=f">= {RPS_TARGET_RATIO:.0%} of baseline",
            met=rps >= RPS_TARGET_RATIO * bare_rps and errors == 0,
            baseline=bare_rps,
            baseline_name=baseline_name,
            ratio=rps / bare_rps,
            detail=detail,
        ),
        Figure(
            figure=f"cached GET /v1/tokens/{{id}}, {connections} connections: p99 latency",
            unit="ms",
            tokvel=p99,
            target="<= baseline p99",
            met=p99 <= bare_p99 and errors == 0,
            baseline=bare_p99,
            baseline_name=baseline_name,
            ratio=p99 / bare_p99,
            detail=detail,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per round")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per server")
    parser.add_argument("--json", type=Path, help="write the figures there (bench/report.py)")
    parser.add_argument("--bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare:
        bare_main(args.bare, args.redis)
        return 0
    if args.load:
        key = os.environ.get("BENCH_KEY") or None
        data = asyncio.run(_python_load(args.load, key, args.seconds, args.connections))
        sys.stdout.write(json.dumps(data) + "\n")
        return 0
    seconds = min(max(args.seconds, 1), 60)  # bounded
    rounds = min(max(args.rounds, 1), 9)
    results = bench(seconds, args.connections, rounds)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    sys.stdout.write(
        f"\n{stamp}  {os.cpu_count()} cores, {args.connections} connections, {seconds} s x "
        f"{rounds} rounds each, load by {results[0].tool}\n"
    )
    sys.stdout.write(f"{'server':<10} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'non-2xx':>8}\n")
    for r in results:
        sys.stdout.write(
            f"{r.name:<10} {r.requests_per_second:>10.0f} {r.p50_ms:>9.2f} {r.p99_ms:>9.2f} "
            f"{r.errors:>8}\n"
        )
    out = figures(results, args.connections, seconds)
    for figure in out:
        sys.stdout.write(
            f"{figure.figure}: {figure.tokvel:.2f} {figure.unit} vs {figure.baseline:.2f} "
            f"(ratio {figure.ratio:.2f}, target {figure.target}): "
            f"{'met' if figure.met else 'NOT met'}\n"
        )
    if args.json:
        write_figures(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
