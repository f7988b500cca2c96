"""Recorded input for the velocity integration tests, its expected output, real workers.

The input is three days of the second recorded 5-minute week (``shared/data``, read in place)
for 40 tokens: the 24 largest, 8 that enter and leave the ranks, and 8 "Low Vol" tokens whose
volume is always missing (not computable; sent in the v1 shape). Every row becomes the
``cmc.quotes.raw`` message the ingestor would publish for it (the replay server's listing
entry, ``listed_at`` = the snapshot time). Mixed in, deterministically: re-polled duplicates,
samples delivered 30 minutes, exactly 12 hours and 13 hours late, and one message for every
dead-letter reason.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka.admin import AIOKafkaAdminClient

from ingestor.replay_data import format_cmc_time, iter_snapshots, to_cmc_entry
from tests.integration.velocity.reference import Expected, Reference, epoch_ms
from tokvel_common.events import DeadLetter, MetricsSample, RawQuote
from tokvel_common.kafka import create_consumer, create_producer
from tokvel_common.paths import SHARED_DATA_DIR
from tokvel_common.serialization import decode, encode_key
from tokvel_common.topics import DEAD_LETTERS, METRICS, METRICS_LATEST, RAW_QUOTES, prefixed

PROJECT_ROOT = Path(__file__).resolve().parents[3]
RECORDING = SHARED_DATA_DIR / "cmc-web-2017-08-24_5min_eval.jsonl.gz"
DAYS = 3
INTERVAL_SECONDS = 300  # the recording's cadence
TOP_RANKS = 24
ENTERING_AND_LEAVING = (918611332, 1853, 1281, 470, 904984971, 1784, 702, 961597265)
LOW_VOL = (957933523, 980492318, 994730262, 934729102, 987343048, 976450314, 941434780, 1396)
WINDOW_TOLERANCE = 1e-8


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes | None
    reason: str | None = None  # the dead-letter reason of an invalid message


def _quote(row: dict[str, Any], at: datetime, *, version: str, poll: str) -> dict[str, Any]:
    return {
        **to_cmc_entry(row, version),
        "polled_at": format_cmc_time(at),
        "listed_at": row["ts"],
        "source": "test:recording",
        "poll_id": poll,
    }


def _invalid(template: dict[str, Any]) -> list[Message]:
    """One message for each reason validation can give, built from a real entry."""

    def variant(**changes: Any) -> bytes:
        return orjson.dumps({**template, **changes})

    key = encode_key(template["id"])
    usd = template["quote"][0]
    last_updated = datetime.fromisoformat(usd["last_updated"].replace("Z", "+00:00"))
    future = format_cmc_time(last_updated + timedelta(hours=1))
    return [
        Message(key, b'{"id": 1, "quote": [', "invalid_json"),
        Message(key, b'{"id": 1, "volume": NaN}', "invalid_json"),
        Message(key, b"[1, 2, 3]", "not_an_object"),
        Message(key, variant(id="one"), "schema_violation"),
        Message(key, variant(poll_id=None), "schema_violation"),
        Message(encode_key(template["id"] + 1), variant(), "key_mismatch"),
        Message(None, variant(), "key_mismatch"),
        Message(key, variant(quote=[]), "missing_usd_quote"),
        Message(
            key,
            variant(last_updated=None, quote=[{**usd, "last_updated": None}]),
            "missing_last_updated",
        ),
        Message(key, variant(quote=[{**usd, "market_cap": -1}]), "negative_number"),
        Message(
            key,
            variant(last_updated=future, quote=[{**usd, "last_updated": future}]),
            "future_timestamp",
        ),
        Message(key, None, "missing_value"),
    ]


@cache
def recorded_messages() -> tuple[Message, ...]:
    """Every message of the replay, in the order it is published (see the module docstring)."""
    rng = random.Random(14)
    start: datetime | None = None
    chosen: set[int] | None = None
    out: list[Message] = []
    delayed: dict[int, list[Message]] = {}  # snapshot index -> messages published then
    for snapshot in iter_snapshots(RECORDING):
        start = start or snapshot.ts
        if snapshot.ts - start >= timedelta(days=DAYS):
            break
        if chosen is None:
            top = {row["cmc_id"] for row in snapshot.rows if row["cmc_rank"] <= TOP_RANKS}
            chosen = top | set(ENTERING_AND_LEAVING) | set(LOW_VOL)
        at = snapshot.ts + timedelta(seconds=2)
        for row in snapshot.rows:
            if row["cmc_id"] not in chosen:
                continue
            version = "v1" if row["cmc_id"] in LOW_VOL else "v3"
            quote = _quote(row, at, version=version, poll=f"poll-{snapshot.index}")
            message = Message(encode_key(row["cmc_id"]), orjson.dumps(quote))
            delay = _delay(row["cmc_id"], snapshot.index)
            if delay:
                delayed.setdefault(snapshot.index + delay, []).append(message)
            else:
                out.append(message)
            if rng.random() < 0.01:  # re-polled within the next few snapshots: a duplicate
                repoll = _quote(row, at + timedelta(minutes=5), version=version, poll="repoll")
                if row["volume_24h_usd"] is not None and rng.random() < 0.5:
                    repoll["quote"][0]["volume_24h"] = row["volume_24h_usd"] * 2  # first wins
                repolled = Message(message.key, orjson.dumps(repoll))
                delayed.setdefault(snapshot.index + rng.randint(1, 3), []).append(repolled)
            if snapshot.index == 300 and row["cmc_id"] == 1:
                out.extend(_invalid(quote))
        out.extend(delayed.pop(snapshot.index, []))
    return tuple(out)


def _delay(cmc_id: int, index: int) -> int:
    """Snapshots a message is held back: late within 12 h, at exactly 12 h, beyond 12 h."""
    if cmc_id in (1, 1027) and index % 50 == 7:
        return 6  # 30 minutes late
    if cmc_id == 52 and index in (200, 400):
        return 144  # 720 minutes behind the newest: the last minute still counted
    if cmc_id == 2 and index in (250, 500):
        return 156  # 13 hours: too late
    return 0


@dataclass
class Expectations:
    samples: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    latest: dict[int, tuple[int, int]] = field(default_factory=dict)  # cmc_id -> sample key
    dead_letters: Counter[tuple[str, str]] = field(default_factory=Counter)  # (reason, raw)
    duplicates: int = 0


@cache
def expectations() -> Expectations:
    """What the processor must publish for recorded_messages(), from the reference."""
    reference = Reference(INTERVAL_SECONDS)
    expected = Expectations()
    for message in recorded_messages():
        raw = (message.value or b"").decode()
        if message.reason is not None:
            expected.dead_letters[(message.reason, raw)] += 1
            continue
        assert message.value is not None
        outcome = reference.feed(decode(message.value, RawQuote))
        if isinstance(outcome, Expected):
            key = (outcome.sample["cmc_id"], epoch_ms(outcome.sample["ts"]))
            expected.samples[key] = outcome.sample
            if outcome.newest:
                expected.latest[key[0]] = key
        elif outcome == "too_late":
            expected.dead_letters[("too_late", raw)] += 1
        else:
            expected.duplicates += 1
    return expected


def assert_sample_matches(actual: MetricsSample, expected: dict[str, Any]) -> None:
    windows = ("velocity", "velocity_24h", "velocity_1h", "velocity_4h", "velocity_12h")
    for name in (*windows, "velocity_7d"):
        got, want = getattr(actual, name), expected[name]
        assert (got is None) == (want is None), (name, actual, expected)
        if want is not None:
            assert abs(got - want) <= WINDOW_TOLERANCE, (name, got, want, actual.ts)
    got_coverage = {name: c.model_dump() for name, c in actual.coverage.items()}
    assert got_coverage == expected["coverage"], (actual.cmc_id, actual.ts)
    if expected["trend_recent_avg"] is None:
        assert actual.trend_recent_avg is None
    else:
        assert abs(actual.trend_recent_avg - expected["trend_recent_avg"]) <= 1e-12
    exact = {k: v for k, v in expected.items() if k not in (*windows, "velocity_7d", "coverage")}
    exact.pop("trend_recent_avg")
    got_exact = {k: getattr(actual, k) for k in exact}
    assert got_exact == exact, (actual.cmc_id, actual.ts)


# ------------------------------------------------------------------------------------- Kafka


async def publish(bootstrap: str, prefix: str, messages: tuple[Message, ...]) -> None:
    producer = create_producer(bootstrap, client_id="velocity-test")
    await producer.start()
    try:
        topic = prefixed(prefix, RAW_QUOTES)
        deliveries = [await producer.send(topic, m.value, key=m.key) for m in messages]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


@dataclass
class Output:
    """Everything the workers published, every copy of every record."""

    samples: dict[tuple[int, int], list[bytes]] = field(default_factory=dict)
    latest: dict[int, tuple[int, int]] = field(default_factory=dict)  # last record's sample
    dead_letters: dict[tuple[int | None, int | None], list[DeadLetter]] = field(
        default_factory=dict
    )


class OutputReader:
    """Reads token.metrics, token.metrics.latest and cmc.quotes.dlq from their beginning."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.output = Output()
        self._names = {
            prefixed(prefix, METRICS): "metrics",
            prefixed(prefix, METRICS_LATEST): "latest",
            prefixed(prefix, DEAD_LETTERS): "dlq",
        }
        self._consumer = create_consumer(
            *self._names, bootstrap_servers=bootstrap, group_id=None, client_id="velocity-test"
        )

    async def __aenter__(self) -> OutputReader:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    async def read_until(self, done: Any, seconds: float) -> Output:
        """Read until ``done(output)`` is true (TimeoutError after ``seconds``)."""
        async with asyncio.timeout(seconds):
            while not done(self.output):
                batches = await self._consumer.getmany(timeout_ms=500, max_records=5000)
                for tp, records in batches.items():
                    for record in records:
                        self._add(self._names[tp.topic], record.key, record.value)
        return self.output

    async def read_complete(
        self, expected: Expectations, seconds: float, workers: Sequence[Worker]
    ) -> Output:
        """Read until the output is complete; if it never is, fail saying what is missing
        and what the workers logged (a stall is otherwise undiagnosable after the fact)."""
        try:
            return await self.read_until(complete(expected), seconds)
        except TimeoutError:
            raise AssertionError(
                f"output incomplete after {seconds:.0f} s: {missing(self.output, expected)}\n"
                + "\n".join(f"--- {w.name} log ---\n{w.log_tail(20_000)}" for w in workers)
            ) from None

    def _add(self, kind: str, key: bytes | None, value: bytes | None) -> None:
        assert value is not None
        if kind in ("metrics", "latest"):
            sample = orjson.loads(value)
            sample_key = (sample["cmc_id"], epoch_ms(datetime.fromisoformat(sample["ts"])))
            if kind == "metrics":
                self.output.samples.setdefault(sample_key, []).append(value)
            else:
                assert key is not None and int(key) == sample_key[0]
                self.output.latest[sample_key[0]] = sample_key
        else:
            letter = decode(value, DeadLetter)
            copies = self.output.dead_letters.setdefault((letter.partition, letter.offset), [])
            copies.append(letter)


def complete(expected: Expectations) -> Any:
    def done(output: Output) -> bool:
        letters = sum(expected.dead_letters.values())
        return (
            len(output.samples) >= len(expected.samples)
            and len(output.dead_letters) >= letters
            and output.latest == expected.latest
        )

    return done


def missing(output: Output, expected: Expectations) -> str:
    """What a stalled output lacks, for the failure message."""
    absent = sorted(set(expected.samples) - set(output.samples))
    stale = {k: (output.latest.get(k), v) for k, v in expected.latest.items()
             if output.latest.get(k) != v}  # fmt: skip
    return (
        f"{len(absent)} of {len(expected.samples)} samples absent (first: {absent[:5]}); "
        f"{len(output.dead_letters)} of {sum(expected.dead_letters.values())} dead letters; "
        f"{len(stale)} tokens' latest differ (first, got vs expected: {list(stale.items())[:5]})"
    )


def assert_output_matches(output: Output, expected: Expectations) -> None:
    """Every distinct sample equals the reference; copies of a sample are byte-identical."""
    assert set(output.samples) == set(expected.samples)
    for key, copies in output.samples.items():
        assert len(set(copies)) == 1, f"copies of {key} differ"
        assert_sample_matches(decode(copies[0], MetricsSample), expected.samples[key])
    assert output.latest == expected.latest
    reasons = Counter((same[0].reason, same[0].raw) for same in output.dead_letters.values())
    assert reasons == expected.dead_letters
    for letters in output.dead_letters.values():
        assert len({(c.reason, c.raw, c.topic) for c in letters}) == 1


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """Faust's own topics under the prefix (the changelog); the fixture deletes the rest."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        own = {
            prefixed(prefix, name) for name in (RAW_QUOTES, DEAD_LETTERS, METRICS, METRICS_LATEST)
        }
        names = [n for n in await admin.list_topics() if n.startswith(prefix) and n not in own]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


# ----------------------------------------------------------------------------------- workers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Worker:
    """One ``python -m velocity`` process with the test's settings, its log in a file."""

    def __init__(
        self, bootstrap: str, prefix: str, directory: Path, name: str, store: str = "memory://"
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = directory / f"{name}.log"
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "TOPIC_PREFIX": prefix,
            "VELOCITY_STORE": store,
            "VELOCITY_DATA_DIR": str(directory / f"{name}-data"),
            "VELOCITY_EXPECTED_INTERVAL_SECONDS": str(INTERVAL_SECONDS),
            "VELOCITY_OPS_HOST": "127.0.0.1",
            "VELOCITY_OPS_PORT": str(self.port),
            # A killed worker's partitions move after 6 s (the broker's minimum).
            "VELOCITY_SESSION_TIMEOUT_SECONDS": "6",
            "VELOCITY_HEARTBEAT_INTERVAL_SECONDS": "1",
            "VELOCITY_REBALANCE_TIMEOUT_SECONDS": "10",
            "VELOCITY_COMMIT_INTERVAL_SECONDS": "0.5",
            "VELOCITY_BATCH_SIZE": "500",
            "VELOCITY_BATCH_WITHIN_SECONDS": "0.1",
            "LOG_LEVEL": "INFO",
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "velocity", cwd=PROJECT_ROOT, env=self.env,
                stdout=log, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> int:
        """SIGTERM, and the exit code (killed after 60 s)."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 60)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode

    async def metric(self, name: str) -> float | None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}/metrics") as response,
        ):
            for line in (await response.text()).splitlines():
                if line.startswith(f"{name} "):
                    return float(line.split()[1])
        return None

    async def get(self, path: str) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}{path}") as response,
        ):
            return response.status, await response.json()

    def log_tail(self, size: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]
