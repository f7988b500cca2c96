"""The poll loop: a fixed schedule, paged listings, dedupe, publishing, and what errors mean.

While this replica holds the lease it polls at ``anchor + k * interval``; a poll that overruns
delays the next tick instead of stacking polls. Each page is published as soon as it arrives,
and whatever was fetched is delivered and recorded in the dedupe ledger before the poll ends,
even when a shutdown abandons the rest of it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka.errors import KafkaError
from pydantic import ValidationError
from redis.exceptions import RedisError

from ingestor.aio import Abandoned, sleep_unless, unless_stopped
from ingestor.cmc_client import (
    LISTINGS_PATHS,
    Action,
    CmcClient,
    CmcError,
    ListingsPage,
    RetryPolicy,
    call_with_retries,
)
from ingestor.lease import RedisLease
from ingestor.ledger import Ledger, LedgerStore
from ingestor.metrics import IngestorMetrics
from ingestor.publisher import InFlight, Outgoing, Publisher
from ingestor.settings import ApiVersion
from ingestor.timing import missed_ticks, next_tick, next_utc_midnight, next_utc_month
from ingestor.token_info import TokenInfoRefresher
from tokvel_common.events import DeadLetter, RawQuote
from tokvel_common.serialization import dumps

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds between attempts to restore the dedupe state when Redis or Kafka is unavailable.
_RECOVERY_RETRY_SECONDS = 2.0


def listings_source(version: ApiVersion) -> str:
    """The ``source`` of every quote the poller publishes: which CMC endpoint answered."""
    return f"cmc-pro-api:{LISTINGS_PATHS[version]}"


def build_quote(
    raw: Any,
    *,
    polled_at: datetime,
    listed_at: datetime | None,
    source: str,
    poll_id: str,
    topic: str,
) -> RawQuote | DeadLetter:
    """One listing entry as received plus where it came from, or the dead letter saying why not.

    ``listed_at`` is the ``status.timestamp`` of the answer that carried the entry.
    """
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"a listing entry must be an object, got {type(raw).__name__}")
        provenance = {
            "polled_at": polled_at, "listed_at": listed_at, "source": source, "poll_id": poll_id,
        }  # fmt: skip
        return RawQuote.model_validate({**raw, **provenance})
    except (ValidationError, TypeError) as exc:
        return DeadLetter(
            reason="invalid_entry",
            detail=str(exc)[:2000],
            # The entry's JSON text as it arrived (re-serialized from the parsed answer).
            raw=dumps(raw).decode(),
            topic=topic,
            rejected_at=polled_at,
        )


class StopPollingError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PollConfig:
    version: ApiVersion
    page_limit: int
    interval: float
    raw_topic: str
    dlq_topic: str


class Poller:
    def __init__(
        self,
        *,
        client: CmcClient,
        publisher: Publisher,
        lease: RedisLease,
        store: LedgerStore,
        recover: Callable[[], Awaitable[Ledger]],
        info: TokenInfoRefresher,
        config: PollConfig,
        policy: RetryPolicy,
        metrics: IngestorMetrics,
        stop: asyncio.Event,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._publisher = publisher
        self._lease = lease
        self._store = store
        self._recover = recover
        self._info = info
        self._config = config
        self._policy = policy
        self._metrics = metrics
        self._stop = stop
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._monotonic = monotonic
        self._wall = wall
        self._source = listings_source(config.version)
        self._ledger = Ledger()
        self.paused_until = 0.0
        self.stopped_reason: str | None = None

    async def run(self) -> str | None:
        """Poll whenever this replica holds the lease, until shutdown (``None``) or a fatal error
        (its reason: polling cannot go on with this key or plan)."""
        while not self._stop.is_set():
            if not await self._lease.wait_held(self._stop):
                break
            try:
                # Another replica may have published since this one last led: start from the
                # state in Redis and on the topic, never from what this process remembers.
                self._ledger = await unless_stopped(self._stop, self._recover())
                await self._info.load()
            except Abandoned:
                break
            except (RedisError, KafkaError, OSError):
                log.exception("could not restore the dedupe state; retrying")
                await sleep_unless(self._stop, _RECOVERY_RETRY_SECONDS)
                continue
            try:
                await self._lead()
            except StopPollingError as exc:
                return exc.reason
        return None

    async def _lead(self) -> None:
        interval = self._config.interval
        anchor = tick = self._monotonic()
        while self._lease.held:
            if await sleep_unless(self._stop, tick - self._monotonic()) or not self._lease.held:
                return
            pause = self.paused_until - self._wall()
            if pause > 0:
                if await sleep_unless(self._stop, pause):
                    return
                self._metrics.paused_until.set(0)
                anchor = tick = self._monotonic()  # a fresh schedule once the credits reset
                continue
            await self.poll_once()
            now = self._monotonic()
            self._metrics.polls_skipped.inc(missed_ticks(anchor, interval, tick, now))
            tick = next_tick(anchor, interval, now)

    async def poll_once(self) -> None:
        """One sweep of the listings; raises :class:`StopPollingError` when polling must end."""
        poll_id = uuid.uuid4().hex
        polled_at = datetime.fromtimestamp(self._wall(), UTC)
        started = self._monotonic()
        quotes: list[InFlight[RawQuote]] = []
        letters: list[InFlight[DeadLetter]] = []
        ids: set[int] = set()
        outcome = "failed"
        try:
            await self._sweep(poll_id, polled_at, quotes, letters, ids)
            outcome = "ok"
        except Abandoned:
            outcome = "abandoned"
            log.info("poll abandoned for shutdown; delivering what was fetched")
        except CmcError as exc:
            self._failed(exc)
        finally:
            await self._settle(quotes, letters)
            self._metrics.polls.labels(outcome).inc()
            self._metrics.poll_duration.observe(self._monotonic() - started)
        if outcome == "ok":
            self._metrics.last_success.set(self._wall())
            await self._refresh_info(ids)

    async def _sweep(
        self,
        poll_id: str,
        polled_at: datetime,
        quotes: list[InFlight[RawQuote]],
        letters: list[InFlight[DeadLetter]],
        ids: set[int],
    ) -> None:
        """Page through the listings until ``total_count`` is covered, publishing each page."""
        version, limit = self._config.version, self._config.page_limit
        start, pages, max_pages = 1, 0, 1
        while True:
            page = await self._request(
                functools.partial(self._client.listings_page, version, start, limit)
            )
            pages += 1
            total = page.total_count
            if pages == 1:
                # CMC's list can grow between pages; one extra page covers that, and a server
                # that keeps sending full pages cannot keep a poll going for ever.
                max_pages = math.ceil(total / limit) + 1
            fresh, dead = self._accept(page, poll_id, polled_at, ids)
            quotes.append(await self._publisher.send(self._config.raw_topic, fresh))
            if dead:
                letters.append(await self._publisher.send(self._config.dlq_topic, dead))
            start += len(page.entries)
            if not page.entries or start > total or pages >= max_pages:
                return

    def _accept(
        self, page: ListingsPage, poll_id: str, polled_at: datetime, ids: set[int]
    ) -> tuple[list[Outgoing[RawQuote]], list[Outgoing[DeadLetter]]]:
        fresh: list[Outgoing[RawQuote]] = []
        dead: list[Outgoing[DeadLetter]] = []
        skipped: Counter[str] = Counter()
        for raw in page.entries:
            built = build_quote(
                raw,
                polled_at=polled_at,
                listed_at=page.status.timestamp,
                source=self._source,
                poll_id=poll_id,
                topic=self._config.raw_topic,
            )
            if isinstance(built, DeadLetter):
                raw_id = raw.get("id") if isinstance(raw, dict) else None
                dead.append(Outgoing(raw_id if isinstance(raw_id, int) else None, built))
                log.warning("invalid listing entry sent to the DLQ", extra={"detail": built.detail})
                continue
            ids.add(built.id)
            verdict = self._ledger.claim(built)
            if verdict == "new":
                fresh.append(Outgoing(built.id, built))
            else:
                skipped[verdict] += 1
        for reason, count in skipped.items():
            self._metrics.quotes_skipped.labels(reason).inc(count)
        self._metrics.quotes_invalid.inc(len(dead))
        return fresh, dead

    async def _settle(
        self, quotes: list[InFlight[RawQuote]], letters: list[InFlight[DeadLetter]]
    ) -> None:
        """Wait for every delivery of the poll, then save the ledger they advanced."""
        for in_flight in quotes:
            report = await self._publisher.deliver(in_flight)
            self._ledger.delivered([m.value for m in report.delivered], report.metadata)
            self._metrics.quotes_published.inc(len(report.delivered))
            self._metrics.undelivered.inc(len(report.undelivered))
        for dead in letters:
            report_dead = await self._publisher.deliver(dead)
            self._metrics.undelivered.inc(len(report_dead.undelivered))
        await self._store.save(self._ledger, self._metrics)

    async def _request(self, call: Callable[[], Awaitable[T]]) -> T:
        async def sleep(seconds: float) -> None:
            if await sleep_unless(self._stop, seconds):
                raise Abandoned("shutdown")

        return await call_with_retries(
            lambda: unless_stopped(self._stop, call()),
            self._policy,
            sleep=sleep,
            wall_clock=self._wall,
            rng=self._rng,
            on_error=lambda exc: self._metrics.poll_failures.labels(exc.reason).inc(),
        )

    def _failed(self, exc: CmcError) -> None:
        """What a request that could not succeed means for polling."""
        details = {
            "reason": exc.reason,
            "detail": exc.detail,
            "http_status": exc.http_status,
            "error_code": exc.error_code,
        }
        if exc.action is Action.STOP:
            self.stopped_reason = exc.reason
            self._metrics.stopped.labels(exc.reason).set(1)
            log.critical("CMC refused the API key or plan: polling stopped", extra=details)
            raise StopPollingError(exc.reason) from exc
        if exc.action in (Action.WAIT_DAY, Action.WAIT_MONTH):
            now = datetime.fromtimestamp(self._wall(), UTC)
            until = next_utc_midnight(now) if exc.action is Action.WAIT_DAY else next_utc_month(now)
            self.paused_until = until.timestamp()
            self._metrics.paused_until.set(self.paused_until)
            log.error(
                "CMC credits exhausted: polling paused until they reset",
                extra={**details, "until": until.isoformat()},
            )
            return
        log.error("poll failed; the next one runs at the next tick", extra=details)

    async def _refresh_info(self, ids: set[int]) -> None:
        try:
            await self._info.refresh(
                ids, lambda batch: self._request(functools.partial(self._client.info, batch))
            )
        except Abandoned:
            return
        except CmcError as exc:
            self._failed(exc)
        except RedisError:
            log.warning("token info fetch times not saved to Redis", exc_info=True)
