"""The stack under attack: ``tokvel run gateway`` and ``tokvel run ws`` as real processes.

Both serve the recorded data (a clone of the gateway suite's loaded database), read their own
``token.metrics`` (a unique topic prefix) and use Redis database 6. Access logs are on in both,
so that the secrets check reads everything a request can make them write. Ports: gateway 18380
and broadcaster 18381, or ``TOKVEL_ABUSE_GATEWAY_PORT`` / ``TOKVEL_ABUSE_WS_PORT``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import asyncpg
import orjson
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from tokvel_common.apikeys import DEFAULT_TIERS, INSERT_KEY, display_prefix, generate_key, hash_key
from tokvel_common.settings import CommonSettings
from ws_broadcaster.settings import DEFAULT_WS_TIERS

TOKVEL: Final = Path(sys.executable).with_name("tokvel")
GATEWAY_PORT: Final = int(os.environ.get("TOKVEL_ABUSE_GATEWAY_PORT", "18380"))
WS_PORT: Final = int(os.environ.get("TOKVEL_ABUSE_WS_PORT", "18381"))
REDIS_DB: Final = 6
PEPPER: Final = "abuse-suite-pepper-3f9c1e"
ALLOWED_ORIGIN: Final = f"http://127.0.0.1:{GATEWAY_PORT}"
START_SECONDS: Final = 60.0
STOP_SECONDS: Final = 20.0

# A tier whose limits never bind, so that the attacks measure what they attack (a fuzzer's
# thousands of requests are not cut short by the rate limit).
UNLIMITED_TIER: Final = "abuse"
API_TIERS: Final = {
    **{name: limits.model_dump() for name, limits in DEFAULT_TIERS.items()},
    UNLIMITED_TIER: {"per_minute": 100_000_000, "per_month": 1_000_000_000},
}
WS_TIERS: Final = {
    **{name: limits.model_dump() for name, limits in DEFAULT_WS_TIERS.items()},
    UNLIMITED_TIER: {
        "max_subscriptions": 5_000,
        "max_connections": 100_000,
        "messages_per_second": 50,
        "burst": 200,
    },
}


def memory_bytes(pid: int) -> tuple[int, int]:
    """(resident now, peak resident since start) of a process, from /proc, in bytes."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024  # the kernel writes kB (KiB)
    return fields["VmRSS"], fields["VmHWM"]


@dataclass
class Service:
    """One running service process: its HTTP base URL and its log file."""

    name: str
    process: asyncio.subprocess.Process
    base_url: str
    log_path: Path
    peak_baseline: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory(self) -> tuple[int, int]:
        return memory_bytes(self.pid)

    def reset_peak(self) -> None:
        """Start measuring the peak afresh: the kernel's peak RSS is set to the current RSS
        (``/proc/PID/clear_refs``, value 5), which is remembered as the baseline."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.peak_baseline = self.memory()[0]

    def alive(self) -> bool:
        return self.process.returncode is None

    async def metric(self, session: aiohttp.ClientSession, name: str, **labels: str) -> float:
        """One sample of the service's /metrics (0 when it is not there yet)."""
        async with session.get(self.base_url + "/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0


@dataclass
class AbuseStack:
    settings: CommonSettings
    database_url: str
    redis_url: str
    topic_prefix: str
    env: dict[str, str]
    gateway: Service
    ws: Service
    keys_issued: list[str] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return self.ws.base_url.replace("http://", "ws://", 1) + "/v1/ws"

    async def new_key(self, tier: str = UNLIMITED_TIER, name: str = "abuse") -> str:
        """A key stored as ``tokvel keys create`` stores it; remembered for the secrets check."""
        key = generate_key()
        conn = await asyncpg.connect(self.database_url)
        try:
            await conn.execute(
                INSERT_KEY, hash_key(key, SecretStr(PEPPER)), display_prefix(key), name, tier
            )
        finally:
            await conn.close()
        self.keys_issued.append(key)
        return key

    async def tokvel_keys(self, *args: str) -> str:
        """``tokvel keys ARGS`` against this stack; its output (the new key is the last line)."""
        process = await asyncio.create_subprocess_exec(
            str(TOKVEL),
            "keys",
            *args,
            env={**os.environ, **self.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        text = output.decode()
        assert process.returncode == 0, text
        return text


def _environment(
    settings: CommonSettings, database_url: str, redis_url: str, topic_prefix: str
) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "TOPIC_PREFIX": topic_prefix,
        "API_KEY_PEPPER": PEPPER,
        "API_TIERS": orjson.dumps(API_TIERS).decode(),
        "LOG_LEVEL": "INFO",
        "HOST": "127.0.0.1",
        "PORT": str(GATEWAY_PORT),
        "ACCESS_LOG": "true",
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(WS_PORT),
        "WS_ACCESS_LOG": "true",
        "WS_TIERS": orjson.dumps(WS_TIERS).decode(),
        "WS_ALLOWED_ORIGINS": orjson.dumps([ALLOWED_ORIGIN]).decode(),
        "WS_INSTANCE_ID": f"abuse-{topic_prefix.strip('.')}",
    }


async def _start(
    name: str, service: str, port: int, env: Mapping[str, str], log_dir: Path
) -> Service:
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            str(TOKVEL), "run", service, env={**os.environ, **env}, stdout=log, stderr=log
        )
    return Service(name, process, f"http://127.0.0.1:{port}", log_path)


async def _wait_ready(session: aiohttp.ClientSession, service: Service) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if not service.alive():
            tail = service.log_path.read_text(errors="replace")[-4000:]
            raise AssertionError(
                f"{service.name} exited with {service.process.returncode}:\n{tail}"
            )
        try:
            async with session.get(service.base_url + "/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{service.name} was not ready within {START_SECONDS:g} s")


async def _stop(service: Service) -> None:
    if service.alive():
        service.process.terminate()
        try:
            await asyncio.wait_for(service.process.wait(), STOP_SECONDS)
        except TimeoutError:
            service.process.kill()
    await service.process.wait()


@asynccontextmanager
async def running_stack(
    settings: CommonSettings,
    database_url: str,
    redis_url: str,
    topic_prefix: str,
    log_dir: Path,
) -> AsyncIterator[AbuseStack]:
    env = _environment(settings, database_url, redis_url, topic_prefix)
    services: list[Service] = []
    try:
        services.append(await _start("gateway", "gateway", GATEWAY_PORT, env, log_dir))
        services.append(await _start("ws-broadcaster", "ws", WS_PORT, env, log_dir))
        async with aiohttp.ClientSession() as session:
            for service in services:
                await _wait_ready(session, service)
        yield AbuseStack(
            settings, database_url, redis_url, topic_prefix, env, services[0], services[1]
        )
    finally:
        await asyncio.gather(*(_stop(service) for service in services))
