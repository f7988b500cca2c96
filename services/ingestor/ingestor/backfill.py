"""``tokvel backfill PATH``: recorded quotes straight into ``cmc.quotes.raw``, resumable.

PATH is a CMC JSON capture (a listings answer, v1 or v3), a JSONL file (recording rows as in
``shared/data``, CMC listing entries, or ``cmc.quotes.raw`` values) or a CSV with the recording's
columns; ``.gz`` is read as is. Entries become the same messages the ingestor publishes (the
recording's rows in the CMC shape of ``--api-version``), ``source`` = ``backfill:<file name>``.

Exactly once across interrupts: a checkpoint in Redis holds the index of the next record and a
watermark (per partition, the offset after this backfill's last checkpointed delivery); it is
written after each batch is acknowledged. A resumed run first reads the topic from the
watermark: whatever a killed run delivered after its last checkpoint is there, and those
``(cmc_id, last_updated)`` are skipped instead of published again.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import itertools
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from redis.exceptions import RedisError
from tqdm import tqdm

from ingestor.aio import sleep_unless
from ingestor.ledger import PublishedKey, published_key, read_tail
from ingestor.metrics import IngestorMetrics
from ingestor.poller import build_quote
from ingestor.publisher import Outgoing, Publisher
from ingestor.replay_data import ReplayDataMissingError, open_text, parse_time, to_cmc_entry
from ingestor.settings import ApiVersion, IngestorSettings
from tokvel_common.events import DeadLetter, RawQuote
from tokvel_common.kafka import create_producer
from tokvel_common.logging import configure_logging
from tokvel_common.redis_client import RedisClient, create_redis
from tokvel_common.serialization import loads
from tokvel_common.topics import DEAD_LETTERS, RAW_QUOTES, prefixed

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
# Recording columns that hold numbers (a CSV has only text).
_NUMERIC_COLUMNS = frozenset(
    {
        "cmc_id", "cmc_rank", "price_usd", "market_cap_usd", "volume_24h_usd",
        "circulating_supply", "total_supply", "max_supply", "percent_change_1h",
        "percent_change_24h", "percent_change_7d",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Record:
    """One entry to publish, with the provenance its message carries."""

    entry: Any  # untrusted: validated when it becomes a message
    polled_at: datetime
    listed_at: datetime | None  # the capture's time: the answer's status.timestamp
    poll_id: str


def _kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind not in (".json", ".jsonl", ".ndjson", ".csv"):
        raise ValueError(f"{path}: not a .json capture, .jsonl or .csv file (optionally .gz)")
    return kind


def _number(text: str) -> int | float | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def _from_row(row: dict[str, Any], version: ApiVersion) -> Record:
    """A line of the recording format, in the CMC shape the ingestor would have received."""
    snapshot_time = parse_time(row["ts"])
    return Record(to_cmc_entry(row, version), snapshot_time, snapshot_time, f"backfill:{row['ts']}")


def _from_json_line(line: Any, version: ApiVersion, name: str) -> Record:
    if isinstance(line, dict) and "ts" in line and "cmc_id" in line:
        return _from_row(line, version)
    if isinstance(line, dict) and "polled_at" in line:  # a cmc.quotes.raw value
        listed_at = line.get("listed_at")
        return Record(
            line,
            parse_time(line["polled_at"]),
            parse_time(listed_at) if isinstance(listed_at, str) else None,
            str(line.get("poll_id", f"backfill:{name}")),
        )
    # A bare listing entry: polled when CMC last updated it, else now (the best known times).
    stamp = line.get("last_updated") if isinstance(line, dict) else None
    polled_at = parse_time(stamp) if isinstance(stamp, str) else datetime.now(UTC)
    return Record(line, polled_at, None, f"backfill:{name}")


def _capture(document: Any, path: Path) -> tuple[str, list[Any]]:
    """The time and entries of a CMC listings answer."""
    status = document.get("status") if isinstance(document, dict) else None
    stamp = status.get("timestamp") if isinstance(status, dict) else None
    if not isinstance(stamp, str) or not isinstance(document.get("data"), list):
        raise ValueError(f"{path}: not a CMC listings answer (status.timestamp, data)")
    return stamp, document["data"]


def iter_records(path: Path, version: ApiVersion, skip: int = 0) -> Iterator[Record]:
    """The entries of the file after the first ``skip``, always in the same order (a
    checkpoint is an index into it); skipped records are not even parsed."""
    kind = _kind(path)
    with open_text(path) as stream:
        if kind == ".json":
            stamp, entries = _capture(loads(stream.read()), path)
            captured = parse_time(stamp)
            for entry in entries[skip:]:
                yield Record(entry, captured, captured, f"backfill:{path.name}:{stamp}")
        elif kind == ".csv":
            with io.TextIOWrapper(stream, encoding="utf-8", newline="") as text:
                for row in itertools.islice(csv.DictReader(text), skip, None):
                    typed = {
                        k: _number(v) if k in _NUMERIC_COLUMNS else v or None
                        for k, v in row.items()
                    }
                    yield _from_row(typed, version)
        else:
            lines = (line for line in stream if line.strip())
            for line in itertools.islice(lines, skip, None):
                yield _from_json_line(loads(line), version, path.name)


def count_records(path: Path) -> int:
    """How many records the file holds, for the progress bar (one cheap pass)."""
    kind = _kind(path)
    with open_text(path) as stream:
        if kind == ".json":
            return len(_capture(loads(stream.read()), path)[1])
        lines = sum(1 for line in stream if line.strip())
    return lines - 1 if kind == ".csv" else lines


def pace(sent: int, rate: float | None, elapsed: float) -> float:
    """Seconds to wait so that ``sent`` messages took at least ``sent / rate`` seconds."""
    return 0.0 if rate is None else max(0.0, sent / rate - elapsed)


@dataclass
class CheckpointState:
    next_index: int
    watermarks: dict[int, int] = field(default_factory=dict)


class Checkpoint:
    """The resume point of one file into one topic, in Redis."""

    def __init__(self, redis: RedisClient, topic: str, path: Path) -> None:
        resolved = path.resolve()
        identity = f"{resolved}|{resolved.stat().st_size}".encode()
        self._redis = redis
        self.key = f"tokvel:backfill:{{{topic}}}:{hashlib.sha256(identity).hexdigest()[:16]}"

    async def load(self) -> CheckpointState | None:
        stored = await self._redis.hgetall(self.key)
        if not stored:
            return None
        watermarks = orjson.loads(stored[b"watermarks"])
        return CheckpointState(
            int(stored[b"next_index"]), {int(p): int(o) for p, o in watermarks.items()}
        )

    async def save(self, state: CheckpointState) -> None:
        await self._redis.hset(
            self.key,
            mapping={
                "next_index": state.next_index,
                "watermarks": orjson.dumps({str(p): o for p, o in state.watermarks.items()}),
            },
        )

    async def clear(self) -> None:
        await self._redis.delete(self.key)


@dataclass
class BackfillResult:
    published: int = 0
    skipped: int = 0  # already on the topic (delivered by an interrupted run)
    invalid: int = 0  # sent to the DLQ
    start_index: int = 0
    end_index: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class BackfillOptions:
    path: Path
    api_version: ApiVersion
    rate: float | None = None
    limit: int | None = None
    batch_size: int = 2000
    restart: bool = False
    progress: bool = True


@asynccontextmanager
async def _clients(
    settings: IngestorSettings, stop: asyncio.Event
) -> AsyncIterator[tuple[RedisClient, Publisher]]:
    async with AsyncExitStack() as stack:
        redis = create_redis(settings.redis_url.get_secret_value(), cluster=settings.redis_cluster)
        stack.push_async_callback(redis.aclose)
        producer = create_producer(
            settings.kafka_bootstrap_servers,
            client_id="tokvel-backfill",
            linger_ms=settings.ingestor_linger_ms,
        )
        await producer.start()
        stack.push_async_callback(producer.stop)
        yield (
            redis,
            Publisher(
                producer,
                IngestorMetrics(),
                stop,
                retry_max_seconds=settings.ingestor_delivery_retry_max_seconds,
            ),
        )


async def _resume_point(
    checkpoint: Checkpoint, settings: IngestorSettings, topic: str
) -> tuple[CheckpointState, set[PublishedKey]]:
    """Where to start and what an interrupted run already delivered past its checkpoint."""
    state = await checkpoint.load()
    now_ms = int(time.time() * 1000)
    # A first run reads nothing (no message is newer than now) but learns where the topic ends;
    # a resumed run reads everything after its watermark.
    tail = await read_tail(
        settings.kafka_bootstrap_servers,
        topic,
        {} if state is None else state.watermarks,
        since_ms=now_ms,
        client_id="tokvel-backfill",
    )
    if state is None:
        return CheckpointState(0, dict(tail.end_offsets)), set()
    return state, set(tail.keys)


async def run_backfill(
    settings: IngestorSettings, options: BackfillOptions, stop: asyncio.Event
) -> BackfillResult:
    topic = prefixed(settings.topic_prefix, RAW_QUOTES)
    dlq_topic = prefixed(settings.topic_prefix, DEAD_LETTERS)
    source = f"backfill:{options.path.name}"
    total = count_records(options.path)
    if options.limit is not None:
        total = min(total, options.limit)
    async with _clients(settings, stop) as (redis, publisher):
        checkpoint = Checkpoint(redis, topic, options.path)
        if options.restart:
            await checkpoint.clear()
        state, already = await _resume_point(checkpoint, settings, topic)
        result = BackfillResult(start_index=state.next_index)
        todo = itertools.islice(
            iter_records(options.path, options.api_version, skip=state.next_index),
            max(0, total - state.next_index),
        )
        started = time.monotonic()
        with tqdm(
            total=total, initial=min(state.next_index, total), unit=" quotes",
            disable=None if options.progress else True, file=sys.stderr,
        ) as bar:  # fmt: skip
            while not stop.is_set() and (batch := list(itertools.islice(todo, options.batch_size))):
                quotes: list[Outgoing[RawQuote]] = []
                letters: list[Outgoing[DeadLetter]] = []
                for record in batch:
                    built = build_quote(
                        record.entry, polled_at=record.polled_at, listed_at=record.listed_at,
                        source=source, poll_id=record.poll_id, topic=topic,
                    )  # fmt: skip
                    if isinstance(built, DeadLetter):
                        letters.append(Outgoing(None, built))
                    elif published_key(built) in already:
                        result.skipped += 1
                    else:
                        quotes.append(Outgoing(built.id, built))
                if not await _deliver(publisher, topic, dlq_topic, quotes, letters, state):
                    break  # shutting down with Kafka failing: resume redoes this batch
                state.next_index += len(batch)
                await checkpoint.save(state)
                result.published += len(quotes)
                result.invalid += len(letters)
                bar.update(len(batch))
                elapsed = time.monotonic() - started
                await sleep_unless(stop, pace(result.published, options.rate, elapsed))
        result.end_index = state.next_index
        result.seconds = time.monotonic() - started
        result.interrupted = state.next_index < total
    return result


async def _deliver(
    publisher: Publisher,
    topic: str,
    dlq_topic: str,
    quotes: list[Outgoing[RawQuote]],
    letters: list[Outgoing[DeadLetter]],
    state: CheckpointState,
) -> bool:
    """Deliver a batch and move the watermark past it; ``False`` if some of it was not."""
    report = await publisher.deliver(await publisher.send(topic, quotes))
    for meta in report.metadata:
        offset = max(state.watermarks.get(meta.partition, 0), meta.offset + 1)
        state.watermarks[meta.partition] = offset
    dead = await publisher.deliver(await publisher.send(dlq_topic, letters))
    return not report.undelivered and not dead.undelivered


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "backfill",
        help="recorded quotes into cmc.quotes.raw, with a progress bar (resumable)",
        description="Load recorded quotes (a CMC JSON capture, JSONL or CSV) into "
        "cmc.quotes.raw; interrupted runs resume where they stopped, without duplicates.",
    )
    parser.add_argument("path", type=Path, help="a CMC JSON capture, JSONL or CSV (.gz too)")
    parser.add_argument("--rate", type=float, help="at most this many quotes per second")
    parser.add_argument("--limit", type=int, help="only the first N records of the file")
    parser.add_argument("--batch-size", type=int, default=2000, help="records per checkpoint")
    parser.add_argument(
        "--api-version", choices=("v3", "v1"), help="CMC shape of recording rows (CMC_API_VERSION)"
    )
    parser.add_argument("--restart", action="store_true", help="ignore the checkpoint, start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    settings = IngestorSettings()
    configure_logging("backfill", settings.log_level)
    try:
        options = BackfillOptions(
            path=args.path,
            api_version=args.api_version or settings.cmc_api_version,
            rate=args.rate,
            limit=args.limit,
            batch_size=args.batch_size,
            restart=args.restart,
            progress=not args.no_progress,
        )
        _kind(options.path)
        if not options.path.is_file():
            raise ReplayDataMissingError(options.path)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"tokvel backfill: {exc}\n")
        return 2
    return asyncio.run(_main(settings, options))


async def _main(settings: IngestorSettings, options: BackfillOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        result = await run_backfill(settings, options, stop)
    except RedisError as exc:
        sys.stderr.write(f"tokvel backfill: Redis unavailable for the checkpoint: {exc}\n")
        return 1
    sys.stdout.write(
        f"backfill {options.path.name}: records {result.start_index}..{result.end_index}, "
        f"published {result.published}, already on the topic {result.skipped}, "
        f"invalid (to the DLQ) {result.invalid}, in {result.seconds:.1f} s "
        f"({result.rate:,.0f} quotes/s)"
        + (" - interrupted, run again to resume\n" if result.interrupted else "\n")
    )
    return EXIT_INTERRUPTED if result.interrupted else 0
