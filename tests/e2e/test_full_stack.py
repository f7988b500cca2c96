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

The expected numbers
--------------------
``velocity`` by ``velocity_of`` and ``trend`` by ``trend_of`` of the velocity suite's reference
(``tests/integration/velocity/reference.py``, plain Python written from ARCHITECTURE.md); the
windows here, as exact rationals: the mean of the computable velocities (the 8-decimal numbers
they are) whose event minute (hour, for 7 d) lies in the window that ends at the sample's own
minute (hour), both edges included. The recording gives each token at most one sample per
snapshot, in event-time order, so every sample is its token's newest when it is computed.

Precision: ``velocity`` and ``velocity_24h`` are compared exactly: the contract rounds them to 8
decimals, and the double nearest that decimal is what every store keeps (``numeric(12,8)``
included). The contract does not round a window mean; it must lie within 1e-15 (relative) of the
exact mean. The service adds doubles (``math.fsum``) and divides, which rounds at most three
times by 2^-53 (about 3.3e-16 in all); one sample too many or too few in a window moves the mean
far more than that, unless that sample equals the mean, and ``points_used`` is compared exactly.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from tests.integration.velocity.reference import trend_of, velocity_of
from tests.integration.velocity.replay import delete_topics
from tests.support.recorded import recorded_rows
from tests.support.stack import (
    ReplaySource,
    StackPorts,
    SupervisedStack,
    stack_environment,
)
from tokvel_common.commands.stack_cmd import DEMO_EXPECTED_INTERVAL_SECONDS
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

WINDOW_MINUTES = {"1h": 60, "4h": 240, "12h": 720}
WEEK_HOURS = 168
WINDOWS = ("1h", "4h", "12h", "7d")
WINDOW_SECONDS = {"1h": 3_600, "4h": 14_400, "12h": 43_200, "7d": 604_800}
MS_MINUTE, MS_HOUR = 60_000, 3_600_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
VELOCITY_DECIMALS = 8
MEAN_RELATIVE_TOLERANCE = Fraction(1, 10**15)

# Deadlines, generous since the CPU is shared: on the 2-core machine, under a load of 8-10, the
# stack is up in 15 s and the whole replay is served 50 s later.
WS_READY_SECONDS = 150.0  # beyond tokvel up's own 120 s
DATA_SECONDS = 180.0
CATCH_UP_SECONDS = 60.0  # what remains once REST serves the newest samples
POLL_INTERVAL_SECONDS = 0.5
SHOWN = 10  # differences listed in a failure message


# ------------------------------------------------------------------------------- reference


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def velocity_units(velocity: float) -> int:
    """The 8-decimal number a velocity stands for, as an integer number of 1e-8 (exact)."""
    units = Decimal(repr(velocity)).scaleb(VELOCITY_DECIMALS)
    assert units == units.to_integral_value(), f"{velocity!r} has more than 8 decimals"
    return int(units)


@dataclass(frozen=True)
class Window:
    mean: Fraction | None
    points_used: int


@dataclass(frozen=True)
class ExpectedSample:
    cmc_id: int
    ts: datetime
    velocity: float
    computable: bool
    windows: Mapping[str, Window]
    trend: str


@dataclass
class _TokenHistory:
    """One token's computable samples so far, in event-time order, with running unit sums."""

    newest_ms: int | None = None
    times: list[int] = field(default_factory=list)
    unit_sums: list[int] = field(default_factory=lambda: [0])
    velocities: list[float] = field(default_factory=list)

    def add(self, ms: int, velocity: float) -> None:
        self.times.append(ms)
        self.unit_sums.append(self.unit_sums[-1] + velocity_units(velocity))
        self.velocities.append(velocity)

    def window(self, start_ms: int) -> Window:
        """The computable samples from ``start_ms`` on (none is newer than the newest)."""
        first = bisect.bisect_left(self.times, start_ms)
        used = len(self.times) - first
        units = self.unit_sums[-1] - self.unit_sums[first]
        mean = Fraction(units, used * 10**VELOCITY_DECIMALS) if used else None
        return Window(mean, used)


@dataclass(frozen=True)
class Replay:
    samples: Mapping[tuple[int, datetime], ExpectedSample]
    newest: Mapping[int, ExpectedSample]  # each token's newest sample
    last_snapshot: frozenset[int]  # the tokens of the last snapshot served


def replayed_rows(path: Path, snapshots: int) -> list[dict[str, Any]]:
    """The rows of the first ``snapshots`` snapshots: what the replay server serves."""
    rows: list[dict[str, Any]] = []
    times: list[str] = []
    for row in recorded_rows(path, "", "~"):  # every row: snapshot times sort as strings
        if not times or row["ts"] != times[-1]:
            if len(times) == snapshots:
                break
            times.append(row["ts"])
        rows.append(row)
    assert len(times) == snapshots, f"{path} has {len(times)} snapshots, not {snapshots}"
    return rows


def expected_replay(rows: Iterable[dict[str, Any]]) -> Replay:
    histories: dict[int, _TokenHistory] = {}
    samples: dict[tuple[int, datetime], ExpectedSample] = {}
    last_ts, last_snapshot = "", set[int]()
    for row in rows:
        if row["ts"] != last_ts:
            last_ts, last_snapshot = row["ts"], set()
        last_snapshot.add(row["cmc_id"])
        # The replay server's rule: the snapshot time when the recording has no last_updated.
        ts = parse_time(row["last_updated"] or row["ts"])
        if (row["cmc_id"], ts) in samples:
            continue  # the same (cmc_id, last_updated) counts once
        ms = (ts - EPOCH) // timedelta(milliseconds=1)
        history = histories.setdefault(row["cmc_id"], _TokenHistory())
        assert history.newest_ms is None or ms > history.newest_ms, "not in event-time order"
        velocity, not_computable = velocity_of(row["volume_24h_usd"], row["market_cap_usd"])
        current = None if not_computable else velocity
        trend, _ = trend_of(current, history.velocities[-3:])
        if current is not None:
            history.add(ms, current)
        history.newest_ms = ms
        windows = {
            name: history.window((ms // MS_MINUTE - minutes) * MS_MINUTE)
            for name, minutes in WINDOW_MINUTES.items()
        }
        windows["7d"] = history.window((ms // MS_HOUR - WEEK_HOURS) * MS_HOUR)
        samples[(row["cmc_id"], ts)] = ExpectedSample(
            row["cmc_id"], ts, velocity, current is not None, windows, trend
        )
    newest: dict[int, ExpectedSample] = {}
    for sample in samples.values():
        newest[sample.cmc_id] = sample  # in event-time order per token: the last one wins
    return Replay(samples, newest, frozenset(last_snapshot))


# ---------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Observed:
    """The numbers of one sample as one of the stack's outputs shows them."""

    cmc_id: int
    ts: datetime
    velocity: float
    velocity_24h: float
    means: Mapping[str, float | None]
    coverage: Mapping[str, tuple[int | None, int | None]]  # points used, expected
    trend: str

    @classmethod
    def of_sample(cls, sample: MetricsSample) -> Observed:
        means = {
            "1h": sample.velocity_1h,
            "4h": sample.velocity_4h,
            "12h": sample.velocity_12h,
            "7d": sample.velocity_7d,
        }
        coverage: dict[str, tuple[int | None, int | None]] = {
            name: (window.points_used, window.points_expected)
            for name, window in sample.coverage.items()
        }
        return cls(
            sample.cmc_id,
            sample.ts,
            sample.velocity,
            sample.velocity_24h,
            means,
            coverage,
            sample.trend,
        )

    @classmethod
    def of_velocity_answer(cls, data: Mapping[str, Any]) -> Observed:
        """``data`` of ``GET /v1/tokens/{cmc_id}/velocity``."""
        windows = data["windows"]
        return cls(
            data["cmc_id"],
            parse_time(data["calculated_at"]),
            data["velocity"],
            data["velocity_24h"],
            {name: data[f"velocity_{name}"] for name in WINDOWS},
            {n: (windows[n]["points_used"], windows[n]["points_expected"]) for n in WINDOWS},
            data["trend"]["direction"],
        )


def mean_matches(served: float | None, exact: Fraction | None) -> bool:
    if exact is None or served is None:
        return served is None and exact is None
    return abs(Fraction(served) - exact) <= exact * MEAN_RELATIVE_TOLERANCE


def differences(seen: Observed, want: ExpectedSample) -> list[str]:
    found = []
    if (seen.velocity, seen.velocity_24h) != (want.velocity, want.velocity):
        found.append(
            f"velocity {seen.velocity!r} / velocity_24h {seen.velocity_24h!r}, "
            f"expected {want.velocity!r}"
        )
    for name, window in want.windows.items():
        served = seen.means[name]
        if not mean_matches(served, window.mean):
            exact = None if window.mean is None else float(window.mean)
            found.append(f"velocity_{name} {served!r}, expected {exact!r} ({window.mean})")
        coverage = (window.points_used, WINDOW_SECONDS[name] // DEMO_EXPECTED_INTERVAL_SECONDS)
        if seen.coverage.get(name) != coverage:
            found.append(f"{name} coverage {seen.coverage.get(name)}, expected {coverage}")
    if seen.trend != want.trend:
        found.append(f"trend {seen.trend}, expected {want.trend}")
    return [f"cmc_id {want.cmc_id} at {want.ts:%Y-%m-%dT%H:%M:%SZ}: {d}" for d in found]


def assert_match(seen: Iterable[Observed], replay: Replay, where: str) -> None:
    problems: list[str] = []
    count = 0
    for item in seen:
        count += 1
        want = replay.samples.get((item.cmc_id, item.ts))
        if want is None:
            problems.append(f"cmc_id {item.cmc_id} at {item.ts}: not a replayed sample")
        else:
            problems.extend(differences(item, want))
    assert not problems, (
        f"{where}: {len(problems)} differences from the reference in {count} samples; "
        f"the first {SHOWN}:\n" + "\n".join(problems[:SHOWN])
    )


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


async def read_topic(bootstrap_servers: str, topic: str) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of every record of every partition, from the start to the current end."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=None,  # no group: every partition, nothing committed
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        assert ends, f"{topic}: no partitions"
        records: list[tuple[bytes | None, bytes]] = []
        async with asyncio.timeout(CATCH_UP_SECONDS):
            while any([await consumer.position(tp) < end for tp, end in ends.items()]):
                batches = await consumer.getmany(timeout_ms=1_000)
                for tp, batch in batches.items():
                    records.extend((r.key, r.value) for r in batch if r.offset < ends[tp])
        return records
    finally:
        await consumer.stop()


def check_metrics_topic(records: list[tuple[bytes | None, bytes]], replay: Replay) -> None:
    samples = [decode(value, MetricsSample) for _, value in records]
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
            check_metrics_topic(await read_topic(settings.kafka_bootstrap_servers, topic), replay)
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
