"""What the benchmarks that run tokvel's services as processes share: scratch databases and
topics that are removed afterwards, starting and stopping those processes, reading their CPU
time and their /metrics, percentiles.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from tests.support.databases import create_database, drop_database, with_database
from tokvel_common.db.migrate import apply_migrations
from tokvel_common.topics import TOPICS, prefixed

ROOT = Path(__file__).resolve().parents[1]
TOKVEL = Path(sys.executable).with_name("tokvel")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MetricSamples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def with_path(url: str, path: str) -> str:
    """``url`` with its path replaced: another database of the same server, a Redis db."""
    return urlunsplit(urlsplit(url)._replace(path=path))


@asynccontextmanager
async def scratch_database(
    admin_dsn: str, label: str, *, prefix: str = "tokvel_bench_"
) -> AsyncIterator[str]:
    """A migrated database of its own for one run (its DSN), dropped at the end."""
    name = await create_database(admin_dsn, prefix=f"{prefix}{label}_")
    try:
        dsn = with_database(admin_dsn, name)
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        await drop_database(admin_dsn, name)


@asynccontextmanager
async def scratch_topics(bootstrap_servers: str, label: str) -> AsyncIterator[str]:
    """Every tokvel topic under a fresh prefix (yielded); at the end, every topic with that
    prefix is deleted, those the services created themselves (Faust changelogs) included."""
    prefix = f"bench-{label}-{uuid.uuid4().hex[:8]}."
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(prefixed(prefix, t.name), t.partitions, 1, topic_configs=t.config)
                for t in TOPICS
            ]
        )
        yield prefix
    finally:
        with suppress(Exception):  # cleaning up must not hide what went wrong before
            names = [name for name in await admin.list_topics() if name.startswith(prefix)]
            await admin.delete_topics(names)
        await admin.close()


async def start_service(
    args: Sequence[str], env: Mapping[str, str], log: Path
) -> asyncio.subprocess.Process:
    """``tokvel <args>`` as a process of its own, its output appended to ``log``."""
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            str(TOKVEL), *args, cwd=ROOT, env=dict(env), stdout=output, stderr=output
        )


async def stop_process(process: asyncio.subprocess.Process, grace_seconds: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``grace_seconds``."""
    if process.returncode is not None:
        return
    with suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_seconds)
    except TimeoutError:
        with suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def scrape(session: aiohttp.ClientSession, url: str) -> MetricSamples | None:
    """Every sample of a Prometheus /metrics page, or None while the server does not answer."""
    try:
        async with session.get(url) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except aiohttp.ClientError:
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def wait_ready(
    url: str, timeout_seconds: float, process: asyncio.subprocess.Process | None = None
) -> None:
    """Until ``url`` answers 200 (a /readyz); fails early when ``process`` exits."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while True:
            with suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            if process is not None and process.returncode is not None:
                raise RuntimeError(f"{url}: the process exited with {process.returncode}")
            if time.monotonic() - started > timeout_seconds:
                raise TimeoutError(f"{url} not ready within {timeout_seconds:g} s")
            await asyncio.sleep(0.2)


def show_logs(directory: Path, lines: int = 15) -> None:
    """The last lines of every service's log, when something went wrong."""
    for log in sorted(directory.glob("*.log")):
        last = log.read_text(errors="replace").splitlines()[-lines:]
        say(f"--- {log.name} (last lines)\n" + "\n".join(last))


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile of sorted values (NaN when there are none)."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]
