"""The whole stack as ``make up`` runs it, end to end, on recorded real data.

``tokvel up`` (what ``make up`` runs) starts the supervisor and its six services with the demo's
settings (the overrides ``tokvel demo`` sets: the local replay server as CMC, windows expecting
the recording's 5-minute cadence) on resources of this test only: a run dir, a database created
empty and migrated by ``tokvel migrate``, a topic prefix, Redis database 5 and ports 18280-18293.
Kafka, PostgreSQL and Redis are the shared local infra, which ``tokvel up`` neither starts nor
stops. The replay server serves the first 150 snapshots of the second recorded 5-minute week
(``cmc-web-2017-08-24_5min_eval``, the week kept for end-to-end comparisons, where a third of the
samples have no volume and are not computable): 12 h 25 min of event time, 209 tokens, 26 567
samples, one snapshot per 0.25 s poll. Within deadlines, every way out of the stack must agree
with an independent computation from the same file:

- REST: ``/v1/tokens`` lists every replayed token at its newest sample, and each token's
  ``/velocity`` has the expected velocity, windows, coverage and trend;
- WebSocket: a subscriber gets an ``update`` for every sample of its tokens from its first
  update on, up to the newest, each with the expected numbers;
- Kafka: a plain aiokafka consumer decodes every message of ``token.metrics``: each replayed
  sample once, each with the expected numbers;
- PostgreSQL: ``token_metrics`` holds exactly the replayed (token, event time) pairs;

no service restarted meanwhile, and ``tokvel down`` leaves no process of the stack behind.

The expected numbers are :mod:`tests.support.replay_reference`'s (its docstring says how they
are computed and how exactly they are compared).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from tests.integration.velocity.replay import delete_topics
from tests.support.kafka import read_records
from tests.support.replay_reference import (
    SHOWN,
    Observed,
    Replay,
    assert_match,
    expected_replay,
    parse_time,
    replayed_rows,
)
from tests.support.stack import (
    ReplaySource,
    StackPorts,
    SupervisedStack,
    stack_environment,
)
from tokvel_common.events import MetricsSample
from tokvel_common.paths import SHARED_DATA_DIR
from tokvel_common.serialization import decode
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import METRICS, prefixed

pytestmark = pytest.mark.e2e

RECORDING = SHARED_DATA_DIR / "cmc-web-2017-08-24_5min_eval.jsonl.gz"
SNAPSHOTS = 150  # 12 h 25 min of event time: the 12 h window drops its first samples
POLL_SECONDS = 0.25
PORTS = StackPorts(
    gateway=18280, ws=18281, replay=18290, ingestor_ops=18291, writer_ops=18292, velocity_ops=18293
)
REDIS_DB = 5
KEY_TIER = "enterprise"  # 6 000 requests a minute: polling plus one /velocity per token
LIST_PAGE = 500  # the gateway's largest page: every replayed token in one answer
BITCOIN, ETHEREUM = 1, 1027

# Deadlines, generous since the CPU is shared: on the 2-core machine, under a load of 8-10, the
# stack is up in 15 s and the whole replay is served 50 s later.
WS_READY_SECONDS = 150.0  # beyond tokvel up's own 120 s
DATA_SECONDS = 180.0
CATCH_UP_SECONDS = 60.0  # what remains once REST serves the newest samples
POLL_INTERVAL_SECONDS = 0.5


# -------------------------------------------------------------------------------- polling


async def wait_until(
    missing: Callable[[], Awaitable[str | None]], *, seconds: float, what: str
) -> None:
    """Until ``missing()`` says nothing is missing (None); else fails with what it last said."""
    deadline = time.monotonic() + seconds
    while True:
        state = await missing()
        if state is None:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {seconds:.0f}s; last seen: {state}")
        await asyncio.sleep(POLL_INTERVAL_SECONDS)


def local(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


async def get_json(
    http: aiohttp.ClientSession, url: str, key: str | None = None
) -> tuple[int, Any]:
    headers = {"X-API-Key": key} if key else {}
    async with http.get(url, headers=headers) as response:
        return response.status, orjson.loads(await response.read())


async def replay_position(http: aiohttp.ClientSession) -> str:
    try:
        _, state = await get_json(http, local(PORTS.replay, "/_replay/state"))
    except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
        return f"replay state unknown ({exc!r})"
    return f"replay at snapshot {state['snapshot_index'] + 1} of {state['snapshots']}"


# ------------------------------------------------------------------------------ WebSocket


@dataclass
class Subscriber:
    """One WebSocket client subscribed to a few tokens, keeping every message it receives."""

    socket: aiohttp.ClientWebSocketResponse
    token_ids: tuple[int, ...]
    subscribed_at: str  # where the replay was then
    messages: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type is aiohttp.WSMsgType.TEXT:
                self.messages.append(orjson.loads(message.data))

    def start(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        await self.socket.close()
        if self.reader is not None:
            await self.reader

    def samples(self, op: str) -> list[tuple[int | None, MetricsSample]]:
        """(seq, sample) of every ``op`` message carrying a sample, in arrival order."""
        return [
            (message.get("seq"), decode(orjson.dumps(message["sample"]), MetricsSample))
            for message in self.messages
            if message["op"] == op and message.get("sample") is not None
        ]

    def newest_seen(self) -> dict[int, datetime]:
        seen: dict[int, datetime] = {}
        for _, sample in self.samples("snapshot") + self.samples("update"):
            seen[sample.cmc_id] = max(sample.ts, seen.get(sample.cmc_id, sample.ts))
        return seen


async def subscribe(
    http: aiohttp.ClientSession,
    key: str,
    token_ids: tuple[int, ...],
    starting: asyncio.Future[object],
) -> Subscriber:
    """As soon as the broadcaster answers (it reads token.metrics from its end), while
    ``starting`` (``tokvel up``) may still wait for the other services."""

    async def not_ready() -> str | None:
        if starting.done():
            starting.result()  # tokvel up failed: say so now, not at the deadline
        try:
            status, _ = await get_json(http, local(PORTS.ws, "/healthz"))
        except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            return repr(exc)
        return None if status == 200 else f"HTTP {status}"

    await wait_until(not_ready, seconds=WS_READY_SECONDS, what="the broadcaster's /healthz")
    socket = await http.ws_connect(f"ws://127.0.0.1:{PORTS.ws}/v1/ws", headers={"X-API-Key": key})
    await socket.send_str(orjson.dumps({"op": "subscribe", "token_ids": token_ids}).decode())
    subscriber = Subscriber(socket, token_ids, await replay_position(http))
    subscriber.start()
    return subscriber


def check_subscriber(subscriber: Subscriber, replay: Replay) -> None:
    ops = [message["op"] for message in subscriber.messages]
    assert ops and ops[0] == "subscribed", f"first WebSocket messages: {ops[:5]}"
    assert set(subscriber.messages[0]["token_ids"]) == set(subscriber.token_ids), ops[:5]
    updates = subscriber.samples("update")
    for token in subscriber.token_ids:
        mine = [(seq, sample) for seq, sample in updates if sample.cmc_id == token]
        assert mine, (
            f"no update for token {token} (subscribed with the {subscriber.subscribed_at}); "
            f"received ops: {sorted(set(ops))}"
        )
        seqs = [seq for seq, _ in mine if isinstance(seq, int)]
        assert len(seqs) == len(mine), f"token {token}: updates without a seq"
        assert seqs == sorted(set(seqs)), f"token {token}: seqs not increasing: {seqs}"
        # From its first update on, the client gets every sample of the token, in order.
        received = [sample.ts for _, sample in mine]
        expected = sorted(ts for (cmc_id, ts) in replay.samples if cmc_id == token)
        expected = [ts for ts in expected if ts >= received[0]]
        assert received == expected, (
            f"token {token}: updates for {len(received)} samples, expected {len(expected)} "
            f"from {received[0]:%H:%M:%S} on; missing "
            f"{sorted(set(expected) - set(received))[:SHOWN]}, unexpected "
            f"{sorted(set(received) - set(expected))[:SHOWN]}"
        )
    shown = subscriber.samples("snapshot") + updates
    assert_match((Observed.of_sample(sample) for _, sample in shown), replay, "WebSocket")


# ---------------------------------------------------------------------------------- Kafka


def check_metrics_topic(records: list[tuple[bytes | None, bytes | None]], replay: Replay) -> None:
    assert all(value is not None for _, value in records), "a tombstone on token.metrics"
    samples = [decode(value or b"", MetricsSample) for _, value in records]
    pairs = zip(records, samples, strict=True)
    wrong_keys = [(key, s.cmc_id) for (key, _), s in pairs if key != str(s.cmc_id).encode()]
    assert not wrong_keys, f"records not keyed by their cmc_id: {wrong_keys[:SHOWN]}"
    keys = [(s.cmc_id, s.ts) for s in samples]
    duplicates = len(keys) - len(set(keys))
    missing = replay.samples.keys() - set(keys)
    assert not duplicates and not missing, (
        f"token.metrics: {len(keys)} records for {len(replay.samples)} replayed samples; "
        f"{duplicates} duplicates, {len(missing)} missing, e.g. {sorted(missing)[:SHOWN]}"
    )
    assert_match(map(Observed.of_sample, samples), replay, "token.metrics")


# ----------------------------------------------------------------------- REST, PostgreSQL


async def wait_for_newest_samples(http: aiohttp.ClientSession, key: str, replay: Replay) -> None:
    """Until ``/v1/tokens`` lists every replayed token, and no other, at its newest sample."""
    url = local(PORTS.gateway, f"/v1/tokens?limit={LIST_PAGE}")

    async def tokens_behind() -> str | None:
        try:
            status, body = await get_json(http, url, key)
        except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            return repr(exc)
        if status != 200:
            return f"GET /v1/tokens: HTTP {status} {body}"
        served = {item["cmc_id"]: parse_time(item["ts"]) for item in body["data"]}
        behind = [t for t, s in replay.newest.items() if served.get(t) != s.ts]
        unexpected = sorted(served.keys() - replay.newest.keys())
        if not behind and not unexpected:
            return None
        return (
            f"{len(behind)} of {len(replay.newest)} tokens not at their newest sample "
            f"(e.g. {behind[:5]}), unexpected tokens {unexpected[:5]}; "
            f"{await replay_position(http)}"
        )

    await wait_until(tokens_behind, seconds=DATA_SECONDS, what="every token at its newest sample")


async def check_velocity_endpoint(http: aiohttp.ClientSession, key: str, replay: Replay) -> None:
    answers = []
    for cmc_id in sorted(replay.newest):
        url = local(PORTS.gateway, f"/v1/tokens/{cmc_id}/velocity")
        status, body = await get_json(http, url, key)
        assert status == 200, f"GET {url}: HTTP {status} {body}"
        answers.append(Observed.of_velocity_answer(body["data"]))
    stale = [(a.cmc_id, a.ts) for a in answers if a.ts != replay.newest[a.cmc_id].ts]
    assert not stale, f"/velocity of an older sample: {stale[:SHOWN]}"
    assert_match(answers, replay, "REST /v1/tokens/{cmc_id}/velocity")


async def check_metrics_table(database_url: str, replay: Replay) -> None:
    """``token_metrics`` holds each replayed (token, event time) once, and nothing else."""
    conn = await asyncpg.connect(database_url)
    try:

        async def rows_missing() -> str | None:
            count = await conn.fetchval("SELECT count(*) FROM token_metrics")
            return None if count == len(replay.samples) else f"{count} rows"

        await wait_until(
            rows_missing,
            seconds=CATCH_UP_SECONDS,
            what=f"token_metrics with the {len(replay.samples)} replayed samples",
        )
        stored = await conn.fetch(
            'SELECT t.cmc_id, m."timestamp" FROM token_metrics m JOIN tokens t ON t.id = m.token_id'
        )
    finally:
        await conn.close()
    pairs = {(row["cmc_id"], row["timestamp"]) for row in stored}
    assert len(pairs) == len(stored) and pairs == replay.samples.keys(), (
        f"token_metrics: {len(stored)} rows, {len(pairs)} distinct; missing "
        f"{sorted(replay.samples.keys() - pairs)[:SHOWN]}, unexpected "
        f"{sorted(pairs - replay.samples.keys())[:SHOWN]}"
    )


# ---------------------------------------------------------------------------------- tests


@pytest.fixture
async def redis_db_5(settings: CommonSettings) -> AsyncIterator[str]:
    """Redis database 5, empty at the start and flushed at the end."""
    base = settings.redis_url.get_secret_value()
    url = urlunsplit(urlsplit(base)._replace(path=f"/{REDIS_DB}"))
    client = Redis.from_url(url)
    try:
        await client.flushdb()
        yield url
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture
async def stack_topics(settings: CommonSettings, topic_prefix: str) -> AsyncIterator[str]:
    """The test's topics; the velocity worker's own (its changelog) are deleted afterwards too."""
    yield topic_prefix
    await delete_topics(settings.kafka_bootstrap_servers, topic_prefix)


@pytest.fixture
def stack(
    settings: CommonSettings,
    tmp_path: Path,
    empty_database_url: str,
    stack_topics: str,
    redis_db_5: str,
) -> Iterator[SupervisedStack]:
    run_dir = tmp_path / "run"
    env = stack_environment(
        run_dir=run_dir,
        ports=PORTS,
        replay=ReplaySource(RECORDING, SNAPSHOTS, POLL_SECONDS),
        kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
        database_url=empty_database_url,
        redis_url=redis_db_5,
        topic_prefix=stack_topics,
    )
    supervised = SupervisedStack(run_dir, PORTS, env)
    yield supervised
    # After a failure midway, stop what is left (the test checks a clean `tokvel down` itself).
    if supervised.leftover_processes():
        supervised.down()
    for pid, _ in supervised.leftover_processes():
        os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(600)
async def test_make_up_serves_every_replayed_sample_as_computed_from_the_recording(
    stack: SupervisedStack, settings: CommonSettings
) -> None:
    replay = expected_replay(replayed_rows(RECORDING, SNAPSHOTS))
    assert len(replay.newest) <= LIST_PAGE
    quiet_token = min(t for t in replay.last_snapshot if not replay.newest[t].computable)
    ws_tokens = (BITCOIN, ETHEREUM, quiet_token)  # the last one: no volume, velocity 0.0
    busy = PORTS.listening()
    assert not busy, f"ports {busy} are taken: is another stack running on them?"
    migrated = stack.tokvel("migrate")
    assert migrated.returncode == 0, migrated.describe()
    key = stack.create_key("e2e", KEY_TIER)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        with stack.explained():
            starting: asyncio.Future[object] = asyncio.ensure_future(asyncio.to_thread(stack.up))
            try:
                subscriber = await subscribe(http, key, ws_tokens, starting)
            finally:
                await starting
            created = sorted(p.name for p in stack.run_dir.iterdir())
            assert not {"kafka", "postgres", "redis"} & set(created), (
                f"tokvel up started infra of its own in {stack.run_dir}: {created}"
            )

            await wait_for_newest_samples(http, key, replay)
            await check_velocity_endpoint(http, key, replay)

            async def updates_behind() -> str | None:
                seen = subscriber.newest_seen()
                behind = {t: seen.get(t) for t in ws_tokens if seen.get(t) != replay.newest[t].ts}
                return f"newest sample received per token: {behind}" if behind else None

            await wait_until(
                updates_behind, seconds=CATCH_UP_SECONDS, what="WebSocket updates up to the newest"
            )
            await subscriber.close()
            check_subscriber(subscriber, replay)

            topic = prefixed(stack.env["TOPIC_PREFIX"], METRICS)
            records = await read_records(
                settings.kafka_bootstrap_servers, topic, within=CATCH_UP_SECONDS
            )
            check_metrics_topic(records, replay)
            await check_metrics_table(stack.env["DATABASE_URL"], replay)

            services = stack.services()
            troubled = {
                name: service
                for name, service in services.items()
                if service["state"] != "running" or service["restarts"] != 0
            }
            assert len(services) == 6 and not troubled, f"services in trouble: {troubled}"

    with stack.explained():
        stopped = stack.down()
        assert stopped.returncode == 0, stopped.describe()
        left = stack.leftover_processes()
        assert not left, f"processes left after tokvel down: {left}"
        listening = PORTS.listening()
        assert not listening, f"ports still open after tokvel down: {listening}"
